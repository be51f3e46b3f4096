//! luagate's integration-test harness (test target `t`, libtest-mimic): one trial
//! per case file `t/cases/<group>/<name>.yaml`, named `group/name`, each running a
//! real luagate against real testbed backends on loopback. With `LUAGATE_T_RELOAD=1`
//! every case is listed a second time as `reload/group/name`, re-run with a SIGHUP
//! reload of the same config between every two steps. `reload/fifty_reloads_under_load`
//! is a hand-written stress trial. `diff/<name>` trials (`t/diff/*.yaml`, `diff.rs`)
//! compare luagate with real OpenResty. `selftest/<name>` trials (`t/selftest/*.yaml`)
//! are cases the harness must fail: a broken luagate or a broken case. See `t/README.md`.

mod case;
mod client;
mod diff;
mod expect;
mod process;
mod redis;
mod reload_stress;
mod runner;

use std::path::{Path, PathBuf};

use libtest_mimic::{Arguments, Failed, Trial};

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("t").join("cases")
}

/// Harness self-tests: cases the harness must fail (`t/selftest/*.yaml`).
fn selftest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("t").join("selftest")
}

fn reload_mode() -> bool {
    std::env::var("LUAGATE_T_RELOAD").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn main() {
    let args = Arguments::from_args();
    let mut trials = Vec::new();
    match case::discover(&cases_dir()) {
        Ok(files) => {
            for file in files {
                let text = std::fs::read_to_string(&file.path).unwrap_or_default();
                let skip = case::skip_reason(&text);
                let reloadable = case::no_reload_reason(&text).is_none();
                let modes: &[bool] = if reload_mode() && reloadable { &[false, true] } else { &[false] };
                for &reload in modes {
                    let name = if reload { format!("reload/{}", file.id) } else { file.id.clone() };
                    let (id, path) = (file.id.clone(), file.path.clone());
                    let trial = Trial::test(name, move || runner::run_trial(&id, &path, reload).map_err(Failed::from));
                    trials.push(trial.with_ignored_flag(skip.is_some()));
                }
            }
        }
        Err(e) => trials.push(Trial::test("cases", move || Err(Failed::from(e)))),
    }
    trials.push(Trial::test("reload/fifty_reloads_under_load", || reload_stress::run().map_err(Failed::from)));
    match case::discover_flat(&selftest_dir()) {
        Ok(files) => {
            for file in files {
                let name = format!("selftest/{}", file.id);
                trials.push(Trial::test(name.clone(), move || {
                    runner::run_selftest(&name, &file.path).map_err(Failed::from)
                }));
            }
        }
        Err(e) => trials.push(Trial::test("selftest", move || Err(Failed::from(e)))),
    }
    trials.extend(diff::trials());
    let conclusion = libtest_mimic::run(&args, trials);
    diff::shutdown();
    conclusion.exit();
}
