//! Runs the load generator in `--quick` mode: every workload must print one JSON line
//! with numeric results, and the run must leave no schema behind.
use std::process::Command;

#[test]
fn loadgen_quick_prints_one_json_line_per_workload() {
    let out = Command::new(crate::common::example("loadgen"))
        .arg("--quick")
        .output()
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "loadgen failed:\n{stdout}\n{stderr}");

    let lines = json_lines(&stdout);
    let workloads: Vec<&str> = lines
        .iter()
        .map(|l| l["workload"].as_str().expect("a workload name"))
        .collect();
    assert_eq!(
        workloads,
        [
            "W1", "W1A", "W2", "W3", "W4", "W5", "W6", "W6X", "W6T", "A6", "A6A", "A12", "A6F",
            "A12F", "W7", "W8", "M1", "P1", "P2", "P3", "G1"
        ],
        "{stdout}"
    );
    for l in &lines {
        for key in ["ours", "raw", "ratio"] {
            let v = l[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} not a number: {l}"));
            assert!(v.is_finite(), "{key} not finite: {l}");
        }
        assert!(l["unit"].is_string(), "{l}");
    }
    // Live delivery lost nothing, on either side.
    let w6 = &lines[6];
    assert_eq!(w6["ours_not_delivered"], 0, "{w6}");
    assert_eq!(w6["raw_not_delivered"], 0, "{w6}");
    // Live delivery through append_in lost nothing either.
    let w6t = lines.iter().find(|l| l["workload"] == "W6T").expect("W6T");
    assert_eq!(w6t["not_delivered"], 0, "{w6t}");
    // append_in with ExpectedVersion::Any never lost to a version conflict.
    for l in lines
        .iter()
        .filter(|l| l["workload"].as_str().unwrap().starts_with('A'))
    {
        assert_eq!(l["ours_version_conflicts"], 0, "{l}");
    }
    // The markdown table lists every workload too.
    for w in &workloads {
        assert!(
            stdout.contains(&format!("\n| {w} |")),
            "{w} missing from the table"
        );
    }

    assert_no_schemas_left(&stderr);
}

/// The A workloads with `append_in` run through `StoreTransaction` and through
/// `PreparedAppends`: each prints its line, marked with its mode, with events appended
/// and no version conflict.
#[test]
fn loadgen_quick_runs_the_a_workloads_through_both_prepared_paths() {
    for (flag, field) in [
        ("--store-transaction", "store_transaction"),
        ("--prepared-appends", "prepared_appends"),
    ] {
        let out = Command::new(crate::common::example("loadgen"))
            .args(["--quick", "--only", "A6,A12F", flag])
            .output()
            .expect("cargo runs");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            out.status.success(),
            "loadgen {flag} failed:\n{stdout}\n{stderr}"
        );
        let lines = json_lines(&stdout);
        let workloads: Vec<&str> = lines
            .iter()
            .filter_map(|l| l["workload"].as_str())
            .collect();
        assert_eq!(workloads, ["A6", "A12F"], "{flag}: {stdout}");
        for l in &lines {
            assert_eq!(l[field], true, "{flag}: {l}");
            assert_eq!(l["ours_version_conflicts"], 0, "{flag}: {l}");
            for key in ["ours", "raw", "ratio"] {
                let v = l[key].as_f64().unwrap_or_else(|| panic!("{key}: {l}"));
                assert!(v.is_finite() && v > 0.0, "{flag}: {key} {l}");
            }
        }
        assert_no_schemas_left(&stderr);
    }
}

/// The JSON lines of the load generator's output, one per workload.
fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
        .collect()
}

/// Every schema of the run that printed `stderr` is gone.
fn assert_no_schemas_left(stderr: &str) {
    let run = stderr
        .lines()
        .find_map(|l| l.strip_prefix("loadgen: schemas "))
        .and_then(|l| l.strip_suffix("_*"))
        .expect("the run names its schemas")
        .to_string();
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| pg_eventstore::DEFAULT_DATABASE_URL.to_string());
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE starts_with(nspname, $1)",
            &[&format!("{run}_")],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "schemas of {run} left behind");
}
