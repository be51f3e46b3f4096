//! luagate's integration-test harness (test target `t`, libtest-mimic): one trial
//! per case file `t/cases/<group>/<name>.yaml`, named `group/name`, each running a
//! real luagate against real testbed backends on loopback. With `LUAGATE_T_RELOAD=1`
//! every case is listed a second time as `reload/group/name`, re-run with a SIGHUP
//! reload of the same config between every two steps. `reload/fifty_reloads_under_load`
//! is a hand-written stress trial. `diff/<name>` trials (`t/diff/*.yaml`, `diff.rs`)
//! compare luagate with real OpenResty. See `t/README.md`.

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

fn reload_mode() -> bool {
    std::env::var("LUAGATE_T_RELOAD").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn main() {
    let args = Arguments::from_args();
    let mut trials = Vec::new();
    match case::discover(&cases_dir()) {
        Ok(files) => {
            for file in files {
                let skip = std::fs::read_to_string(&file.path).ok().and_then(|t| case::skip_reason(&t));
                let modes: &[bool] = if reload_mode() { &[false, true] } else { &[false] };
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
    trials.extend(diff::trials());
    let conclusion = libtest_mimic::run(&args, trials);
    diff::shutdown();
    conclusion.exit();
}
