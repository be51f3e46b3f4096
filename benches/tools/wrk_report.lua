-- wrk -s wrk_report.lua: prints one JSON line (prefixed WRKJSON) when the run
-- ends, with totals, error counts and latency percentiles in microseconds.
-- It defines no request()/response() hook, so wrk keeps its fast path.
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
        '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d,' ..
        '"max_us":%d,"mean_us":%.1f}\n',
        summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
        e.timeout, latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
        latency.max, latency.mean))
end
