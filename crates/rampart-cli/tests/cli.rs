//! Black-box tests of the `rampart` binary on the real cloudtrail pipeline and the real
//! Stratus Red Team logs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;

use common::root;

fn rampart(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("rampart runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("output file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// A copy of the cloudtrail pipeline, for tests that change it.
fn pipeline_copy(dir: &Path) -> PathBuf {
    common::pipeline_copy("cloudtrail", dir)
}

const STRATUS: &str = "data/cloudtrail/stratus-detonation-logs";

/// The cloudtrail pipeline's sliding-window (threshold) detectors.
const THRESHOLDS: [&str; 6] = [
    "console-password-spraying",
    "ec2-password-data-burst",
    "ec2-user-data-downloads",
    "recon-denied-calls",
    "root-console-login-failures",
    "secrets-mass-read",
];

#[test]
fn check_and_test_pass_on_the_cloudtrail_pipeline() {
    let out = rampart(&["check", "pipelines/cloudtrail"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        text(&out.stdout).contains("ok: pipeline `cloudtrail`: 28 detectors (17 per-event, "),
        "{}",
        text(&out.stdout)
    );
    // Each windowed detector says when it decides: the thresholds at once.
    for id in THRESHOLDS {
        assert!(
            text(&out.stdout).contains(&format!("{id}: decides at once")),
            "{id}: {}",
            text(&out.stdout)
        );
    }

    let out = rampart(&["test", "pipelines/cloudtrail"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(!stdout.contains("FAIL"), "{stdout}");
    let passed = stdout
        .lines()
        .find(|l| l.starts_with("PASS: "))
        .expect("a PASS line");
    let (n, total) = passed["PASS: ".len()..].split_once('/').expect("n/total");
    assert_eq!(n, total);
    assert!(n.parse::<usize>().expect("count") >= 65, "{passed}");
}

#[test]
fn replay_of_the_stratus_logs_gives_schema_valid_deterministic_decisions() {
    let tmp = tempfile::tempdir().expect("tmp");
    let first = tmp.path().join("a.jsonl");
    let second = tmp.path().join("b.jsonl");
    let dead = tmp.path().join("dead.jsonl");
    for out in [&first, &second] {
        let run = rampart(&[
            "replay",
            "pipelines/cloudtrail",
            "--input",
            STRATUS,
            "--output",
            out.to_str().expect("utf8"),
            "--dead-letters",
            dead.to_str().expect("utf8"),
        ]);
        assert!(run.status.success(), "{}", text(&run.stderr));
        let summary = text(&run.stderr);
        assert!(summary.contains("events:      310 from 35 file(s)"), "{summary}");
        assert!(summary.contains("bad records: 0"), "{summary}");
    }
    // The files are read in name order, not event-time order: events more than the allowed
    // lateness older than the newest seen are dead letters marked `late` (windows do not count
    // them; per-event detectors still judge them).
    let dead = lines(&dead);
    assert!(!dead.is_empty());
    for letter in &dead {
        assert_eq!(letter["kind"], "late", "{letter}");
        assert!(
            letter["error"]
                .as_str()
                .expect("error")
                .contains("allowed lateness (5m)"),
            "{letter}"
        );
    }

    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("schemas/decision.schema.json")).expect("schema"),
    )
    .expect("json");
    let validator = jsonschema::validator_for(&schema).expect("valid schema");
    let decisions = lines(&first);
    for d in &decisions {
        let errors: Vec<String> = validator
            .iter_errors(d)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{errors:?}\n{d:#}");
    }

    // Every technique with a per-event signature is caught; blocks expire; guidance travels.
    let fired: BTreeSet<&str> = decisions
        .iter()
        .map(|d| d["detector"]["id"].as_str().expect("id"))
        .filter(|id| !THRESHOLDS.contains(id))
        .collect();
    let expected = [
        "ami-shared",
        "console-login-without-mfa",
        "ebs-snapshot-shared",
        "iam-access-key-for-another-user",
        "iam-admin-policy-attached",
        "iam-login-profile-for-another-user",
        "iam-role-trusts-outside-account",
        "lambda-code-overwritten",
        "lambda-layer-added",
        "lambda-public-invoke-permission",
        "network-logs-deleted",
        "organization-leave-attempt",
        "rds-snapshot-shared",
        "rolesanywhere-trust-anchor-created",
        "security-group-ssh-open-to-world",
        "trail-event-selectors-narrowed",
        "trail-logging-disabled",
    ];
    assert_eq!(fired, expected.into_iter().collect());
    let per_event = |d: &&Value| !THRESHOLDS.contains(&d["detector"]["id"].as_str().expect("id"));
    assert_eq!(decisions.iter().filter(per_event).count(), 23);
    let stop = decisions
        .iter()
        .find(|d| d["actions"][0] == "StopLogging")
        .expect("StopLogging decision");
    assert_eq!(stop["verdict"], "block");
    assert_eq!(stop["event_time"], "2024-07-31T13:06:24Z");
    assert_eq!(stop["expires_at"], "2024-07-31T17:06:24Z", "block_for: 4h");
    assert_eq!(
        stop["source"]["file"],
        format!("{STRATUS}/aws.defense-evasion.cloudtrail-stop.json")
    );
    assert_eq!(stop["source"]["line"], 2);
    assert_eq!(
        stop["evidence"]["trail"],
        "stratus-red-team-ct-stop-trail-buykxbqejv"
    );
    assert!(
        stop["reason"]
            .as_str()
            .expect("reason")
            .contains("on trail stratus-red-team-ct-stop-trail-buykxbqejv")
    );
    assert!(
        stop["guidance"]
            .as_str()
            .expect("guidance")
            .contains("Security on-call")
    );

    // Same input, same decisions, same ids (only processed_at differs).
    let strip = |mut v: Value| {
        v.as_object_mut().expect("object").remove("processed_at");
        v
    };
    let again: Vec<Value> = lines(&second).into_iter().map(strip).collect();
    assert_eq!(decisions.into_iter().map(strip).collect::<Vec<_>>(), again);
}

#[test]
fn gzip_inputs_and_cloudtrail_records_files_decode_the_same() {
    use std::io::Write;
    let tmp = tempfile::tempdir().expect("tmp");
    let records: Value = serde_json::from_str(
        &std::fs::read_to_string(
            root()
                .join(STRATUS)
                .join("aws.persistence.iam-create-admin-user.json"),
        )
        .expect("file"),
    )
    .expect("json");
    let gz = tmp.path().join("trail.json.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).expect("create"),
        flate2::Compression::default(),
    );
    enc.write_all(
        serde_json::to_string(&serde_json::json!({ "Records": records }))
            .expect("json")
            .as_bytes(),
    )
    .expect("write");
    enc.finish().expect("gzip");
    let out = tmp.path().join("d.jsonl");
    let run = rampart(&[
        "replay",
        "pipelines/cloudtrail",
        "--input",
        gz.to_str().expect("utf8"),
        "--output",
        out.to_str().expect("utf8"),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let ids: BTreeSet<String> = lines(&out)
        .iter()
        .map(|d| d["detector"]["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(
        ids,
        // (The user it creates gets no MFA device: an absence, decided at the end.)
        [
            "iam-access-key-for-another-user",
            "iam-admin-policy-attached",
            "iam-user-without-mfa"
        ]
        .map(String::from)
        .into()
    );
}

#[test]
fn hostile_detectors_are_refused_with_file_and_reason_and_the_rest_still_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pipeline = pipeline_copy(tmp.path());
    let header = "-- id: ID\n-- verdict: block\n-- severity: high\n-- reason: r\n";
    let hostile = [
        ("copy", "COPY (SELECT * FROM events) TO '/tmp/stolen.csv'"),
        (
            "external",
            "CREATE EXTERNAL TABLE creds STORED AS CSV LOCATION '/etc/passwd'",
        ),
        ("readfile", "SELECT * FROM read_csv('/etc/passwd')"),
        ("two", "SELECT actor FROM events;\nDROP TABLE events"),
        ("insert", "INSERT INTO events SELECT * FROM events"),
        ("set", "SET datafusion.execution.target_partitions = 8"),
        ("url", "SELECT * FROM '/etc/passwd'"),
        (
            "regex",
            "SELECT actor FROM events WHERE regexp_like(action, '((a{100}){100}){100}')",
        ),
        (
            "recursive",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT actor FROM events, r",
        ),
    ];
    for (name, sql) in hostile {
        let text = format!("{}{sql}\n", header.replace("ID", name));
        std::fs::write(pipeline.join("detectors").join(format!("zz-{name}.sql")), text).expect("write");
    }
    let dir = pipeline.to_str().expect("utf8");
    let out = rampart(&["check", dir]);
    let stdout = text(&out.stdout);
    assert!(!out.status.success());
    let expect = [
        ("zz-copy.sql:5:", "COPY (writing files) is not allowed"),
        (
            "zz-external.sql:5:",
            "CREATE EXTERNAL TABLE (reading files) is not allowed",
        ),
        (
            "zz-readfile.sql:5:",
            "table function `read_csv(...)` is not allowed",
        ),
        ("zz-two.sql:6:", "exactly one SELECT query"),
        ("zz-insert.sql:5:", "DML (`INSERT INTO`) is not allowed"),
        (
            "zz-set.sql:5:",
            "SET (`SET datafusion.execution.target_partitions`) is not allowed",
        ),
        ("zz-url.sql:5:", "the query does not plan"),
        (
            "zz-regex.sql:5:",
            "the regular expression `((a{100}){100}){100}` compiles to more than 10485760 bytes",
        ),
        ("zz-recursive.sql:5:", "recursive"),
    ];
    for (location, reason) in expect {
        let line = stdout
            .lines()
            .find(|l| l.contains(location))
            .unwrap_or_else(|| panic!("no problem at {location}:\n{stdout}"));
        assert!(line.contains(reason), "{line}");
    }
    assert!(
        stdout.contains("9 problem(s); 28 detector(s) loaded, 9 refused"),
        "{stdout}"
    );

    let decisions = tmp.path().join("d.jsonl");
    let run = rampart(&[
        "replay",
        dir,
        "--input",
        STRATUS,
        "--output",
        decisions.to_str().expect("utf8"),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(text(&run.stderr).contains("warning: detector refused, the others run"));
    let per_event = lines(&decisions)
        .iter()
        .filter(|d| !THRESHOLDS.contains(&d["detector"]["id"].as_str().expect("id")))
        .count();
    assert_eq!(per_event, 23);
    assert!(!Path::new("/tmp/stolen.csv").exists());
}

#[test]
fn malformed_lines_become_dead_letters_with_their_line_and_good_lines_still_decide() {
    let tmp = tempfile::tempdir().expect("tmp");
    let good: Vec<Value> = [
        "aws.defense-evasion.cloudtrail-stop.json",
        "aws.exfiltration.ec2-share-ami.json",
    ]
    .iter()
    .map(|f| {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(root().join(STRATUS).join(f)).expect("file"))
                .expect("json");
        v[0].clone()
    })
    .collect();
    let mut no_actor = good[0].clone();
    no_actor.as_object_mut().expect("object").remove("userIdentity");
    let mut bad_time = good[0].clone();
    bad_time["eventTime"] = Value::from(true);
    let input = [
        serde_json::to_string(&good[0]).expect("json"),
        "{\"eventTime\": \"2024-07-31T13:06:24Z\", ".to_string(),
        String::new(),
        "not json at all".to_string(),
        serde_json::to_string(&no_actor).expect("json"),
        serde_json::to_string(&bad_time).expect("json"),
        serde_json::to_string(&good[1]).expect("json"),
    ]
    .join("\n");
    let file = tmp.path().join("mixed.jsonl");
    std::fs::write(&file, input).expect("write");
    let decisions = tmp.path().join("d.jsonl");
    let dead = tmp.path().join("dead.jsonl");
    let run = rampart(&[
        "replay",
        "pipelines/cloudtrail",
        "--input",
        file.to_str().expect("utf8"),
        "--output",
        decisions.to_str().expect("utf8"),
        "--dead-letters",
        dead.to_str().expect("utf8"),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(
        text(&run.stderr).contains("bad records: 4"),
        "{}",
        text(&run.stderr)
    );
    let decided: Vec<String> = lines(&decisions)
        .iter()
        .map(|d| d["detector"]["id"].as_str().expect("id").to_string())
        .collect();
    // (The stopped trail is not started again within 15 minutes: decided once the watermark
    // passes, before the later AMI share.)
    assert_eq!(
        decided,
        [
            "trail-logging-disabled",
            "trail-logging-not-restarted",
            "ami-shared"
        ]
    );
    let letters = lines(&dead);
    let summary: Vec<(u64, &str)> = letters
        .iter()
        .map(|l| {
            (
                l["source"]["line"].as_u64().expect("line"),
                l["error"].as_str().expect("error"),
            )
        })
        .collect();
    assert_eq!(summary.len(), 4, "{summary:?}");
    assert_eq!(summary[0].0, 2);
    assert!(
        summary[0].1.starts_with("not JSON: EOF while parsing"),
        "{summary:?}"
    );
    assert_eq!(summary[1].0, 4);
    assert!(summary[1].1.starts_with("not JSON"), "{summary:?}");
    assert_eq!(
        summary[2],
        (
            5,
            "missing actor (looked at userIdentity.arn | userIdentity.principalId | userIdentity.invokedBy)"
        )
    );
    assert_eq!(
        summary[3],
        (
            6,
            "wrong type at `eventTime`: expected an RFC 3339 string or epoch milliseconds, found a boolean"
        )
    );
    assert!(letters.iter().all(|l| {
        l["kind"] == "malformed"
            && l["source"]["file"]
                .as_str()
                .expect("file")
                .ends_with("mixed.jsonl")
    }));
    assert_eq!(letters[1]["record"], "not json at all");
}

/// A gzip bomb, a 10,000-deep JSON array and a line of 5 MB, beside the real detonation logs:
/// each refused with its reason, everything else decided.
#[test]
fn hostile_input_is_refused_with_its_reason_and_the_rest_is_decided() {
    use std::io::Write;
    let tmp = tempfile::tempdir().expect("tmp");
    let inputs = tmp.path().join("inputs");
    std::fs::create_dir_all(&inputs).expect("mkdir");
    for entry in std::fs::read_dir(root().join(STRATUS)).expect("ls") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, inputs.join(path.file_name().expect("name"))).expect("copy");
    }
    // 96 MiB of one 1 KiB record, gzip: about 100 KB.
    let record = format!(
        r#"{{"eventTime":"2024-08-01T12:00:00Z","userIdentity":{{"arn":"arn:aws:iam::1:user/bomb"}},"eventName":"GetObject","eventSource":"s3.amazonaws.com","pad":"{}"}}"#,
        "b".repeat(850)
    );
    let mut bomb = flate2::write::GzEncoder::new(
        std::fs::File::create(inputs.join("zz-bomb.json.gz")).expect("create"),
        flate2::Compression::best(),
    );
    for _ in 0..96 << 10 {
        writeln!(bomb, "{record}").expect("write");
    }
    bomb.finish().expect("gzip");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let long = format!(r#"{{"pad":"{}"}}"#, "z".repeat(5 << 20));
    std::fs::write(inputs.join("zz-deep.jsonl"), format!("{deep}\n{long}\n")).expect("write");

    let (decisions, dead) = (tmp.path().join("d.jsonl"), tmp.path().join("dead.jsonl"));
    let run = rampart(&[
        "replay",
        "pipelines/cloudtrail",
        "--input",
        inputs.to_str().expect("utf8"),
        "--output",
        decisions.to_str().expect("utf8"),
        "--dead-letters",
        dead.to_str().expect("utf8"),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let per_event = lines(&decisions)
        .iter()
        .filter(|d| !THRESHOLDS.contains(&d["detector"]["id"].as_str().expect("id")))
        .count();
    assert_eq!(per_event, 23, "every detonation is still caught");
    let letters = lines(&dead);
    let reason = |file: &str, needle: &str| {
        letters.iter().any(|l| {
            l["source"]["file"].as_str().is_some_and(|f| f.ends_with(file))
                && l["error"].as_str().is_some_and(|e| e.contains(needle))
        })
    };
    assert!(
        reason("zz-bomb.json.gz", "refused as a decompression bomb"),
        "{letters:#?}"
    );
    assert!(reason("zz-deep.jsonl", "recursion limit"), "{letters:#?}");
    assert!(
        reason(
            "zz-deep.jsonl",
            "over the limit of 262144 (source.max_record_bytes)"
        ),
        "{letters:#?}"
    );
    let malformed: Vec<&Value> = letters.iter().filter(|l| l["kind"] != "late").collect();
    assert!(
        malformed.len() <= 4,
        "one letter each, and the record the bomb was cut in: {malformed:#?}"
    );
}

#[test]
fn replay_reads_standard_input() {
    use std::io::Write;
    use std::process::Stdio;
    let records = std::fs::read(
        root()
            .join(STRATUS)
            .join("aws.defense-evasion.cloudtrail-stop.json"),
    )
    .expect("file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["replay", "pipelines/cloudtrail", "--input", "-"])
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rampart runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&records)
        .expect("write");
    let out = child.wait_with_output().expect("exits");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The block at once; the trail not started again, at the end of the input.
    let decisions: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a decision"))
        .collect();
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    assert_eq!(decisions[1]["detector"]["id"], "trail-logging-not-restarted");
    let decision = &decisions[0];
    assert_eq!(decision["detector"]["id"], "trail-logging-disabled");
    assert_eq!(
        decision["source"],
        serde_json::json!({"file": "<stdin>", "line": 2})
    );
}

#[test]
fn every_command_explains_itself_with_an_example() {
    for cmd in ["check", "test", "replay", "run"] {
        let out = rampart(&[cmd, "--help"]);
        assert!(out.status.success());
        let help = text(&out.stdout);
        assert!(
            help.contains("Example:") && help.contains(&format!("rampart {cmd} pipelines/cloudtrail")),
            "{help}"
        );
    }
}

#[test]
fn run_without_a_kafka_section_says_what_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = pipeline_copy(dir.path());
    let toml = pipeline.join("pipeline.toml");
    let config = std::fs::read_to_string(&toml).expect("read");
    let cut = config
        .find("\n# Service mode")
        .expect("the cloudtrail pipeline has a service section");
    std::fs::write(&toml, &config[..cut]).expect("write");
    let state = dir.path().join("state");
    let out = rampart(&[
        "run",
        pipeline.to_str().expect("utf-8"),
        "--state",
        state.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("has no [kafka] section"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn tls_files_that_do_not_fit_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = pipeline_copy(dir.path());
    let toml = pipeline.join("pipeline.toml");
    let original = std::fs::read_to_string(&toml).expect("read");
    let tls = root().join("crates/rampart-service/testdata/tls");
    let with = |service: &str| {
        std::fs::write(
            &toml,
            original.replace("[service]\n", &format!("[service]\n{service}\n")),
        )
        .expect("write");
    };
    let path = pipeline.to_str().expect("utf-8");
    let state = dir.path().join("state");
    let run = || {
        rampart(&[
            "run",
            path,
            "--state",
            state.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
        ])
    };

    // One file without the other: `rampart check` names the line.
    with(&format!(
        "tls_certificate = \"{}\"",
        tls.join("server1.pem").display()
    ));
    let out = rampart(&["check", path]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("pipeline.toml:51"), "{err}");
    assert!(
        err.contains("`service.tls_certificate` and `service.tls_key` go together"),
        "{err}"
    );

    // A key that is not the certificate's, or a file that is not there, stops the start
    // before anything is consumed.
    for (certificate, key, reason) in [
        ("server1.pem", "server2.key", "does not belong to the certificate"),
        ("missing.pem", "server1.key", "cannot read the TLS certificate"),
        ("server1.pem", "ca.pem", "cannot read the TLS private key"),
    ] {
        with(&format!(
            "tls_certificate = \"{}\"\ntls_key = \"{}\"",
            tls.join(certificate).display(),
            tls.join(key).display()
        ));
        let out = run();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{certificate} {key}: {err}");
        assert!(err.contains(reason), "{certificate} {key}: {err}");
    }
}

/// A copy of the saas-usage pipeline, with its tables.
fn saas_copy(dir: &Path) -> PathBuf {
    common::pipeline_copy("saas-usage", dir)
}

const SAAS_DATA: &str = "pipelines/saas-usage/tests/data";

#[test]
fn repeats_are_suppressed_and_counted_and_plan_numbers_are_in_the_reasons() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("d.jsonl");
    let o = rampart(&[
        "replay",
        "pipelines/saas-usage",
        "--input",
        &format!("{SAAS_DATA}/globex-burst.jsonl"),
        "--output",
        out.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let decisions = lines(&out);
    let summary: Vec<(&str, &str)> = decisions
        .iter()
        .map(|d| {
            (
                d["detector"]["id"].as_str().unwrap_or(""),
                d["verdict"].as_str().unwrap_or(""),
            )
        })
        .collect();
    // The hard limit (`n > limit`) decides at once, when the 61st request's second is
    // complete; the soft band (`n > soft AND n <= hard`) could stop holding, so it decides at
    // the watermark: the block comes first.
    assert_eq!(
        summary,
        [("usage-hard-limit", "block"), ("usage-soft-limit", "alert")],
        "one alert, one block; the repeats are suppressed"
    );
    assert!(
        decisions[0]["reason"].as_str().is_some_and(
            |r| r.contains("61 requests in one minute, over the hard limit of plan free (60 per minute)")
        ),
        "{}",
        decisions[0]["reason"]
    );
    let stderr = text(&o.stderr);
    assert!(stderr.contains("suppressed:  28 repeat decision(s)"), "{stderr}");
    assert!(
        stderr.contains("usage-soft-limit                             19"),
        "{stderr}"
    );
    assert!(
        stderr.contains("usage-hard-limit                             9"),
        "{stderr}"
    );
}

#[test]
fn a_detector_that_would_block_everyone_falls_back_to_shadow_and_the_audit_log_holds() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = saas_copy(tmp.path());
    std::fs::write(
        dir.join("detectors/broken.sql"),
        "-- id: broken\n-- verdict: block\n-- severity: high\n-- reason: {{actor}} called {{action}}\n\
         -- block_for: 1h\nSELECT actor, action FROM events WHERE status >= 0\n",
    )
    .expect("write");
    let out = tmp.path().join("d.jsonl");
    let audit = tmp.path().join("audit.log");
    let o = rampart(&[
        "replay",
        dir.to_str().expect("utf-8"),
        "--input",
        &format!("{SAAS_DATA}/normal.jsonl"),
        "--output",
        out.to_str().expect("utf-8"),
        "--compare",
        "--audit",
        audit.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stderr = text(&o.stderr);
    let decisions = lines(&out);
    let of = |verdict: &str, mode: &str| -> Vec<&Value> {
        decisions
            .iter()
            .filter(|d| d["detector"]["id"] == "broken" && d["verdict"] == verdict && d["mode"] == mode)
            .collect()
    };
    let enforced = of("block", "enforce");
    let alerts = of("alert", "enforce");
    let revokes = of("revoke", "enforce");
    let shadow = of("block", "shadow");
    // 120 keys in 5 minutes: the share limit (10% of the actors active in the minute, from 10
    // keys) trips long before everyone is blocked.
    assert!(
        (9..=12).contains(&enforced.len()),
        "{} blocks were enforced before the fail-safe tripped",
        enforced.len()
    );
    assert_eq!(alerts.len(), 1, "one alert explains the fall-back");
    let reason = alerts[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("blast-radius fail-safe: detector `broken` would have blocked"),
        "{reason}"
    );
    assert!(
        alerts[0]["tags"]
            .as_array()
            .is_some_and(|t| t.contains(&Value::from("fail-safe")))
    );
    let blocked: BTreeSet<&str> = enforced.iter().filter_map(|d| d["actor"].as_str()).collect();
    let revoked: BTreeSet<&str> = revokes.iter().filter_map(|d| d["actor"].as_str()).collect();
    assert_eq!(blocked, revoked, "every block of the burst is revoked");
    assert!(shadow.len() > 50, "the rest run in shadow: {}", shadow.len());
    assert!(
        stderr.contains("fail-safe:   `broken` fell back to shadow"),
        "{stderr}"
    );
    // The other detectors are untouched.
    assert!(
        decisions.iter().all(|d| d["detector"]["id"] == "broken"),
        "normal traffic"
    );

    // --compare: what shadow would have done against what enforce did.
    assert!(stderr.contains("shadow `broken` (block, alert):"), "{stderr}");
    assert!(stderr.contains("only in shadow:"), "{stderr}");
    let c = rampart(&["compare", out.to_str().expect("utf-8")]);
    assert!(c.status.success());
    assert!(
        text(&c.stdout).contains("would have blocked or held"),
        "{}",
        text(&c.stdout)
    );

    // The audit log: rules, then every decision; any edit, removal or reordering is found.
    let v = rampart(&["audit", "verify", audit.to_str().expect("utf-8")]);
    assert!(v.status.success(), "{}", text(&v.stdout));
    let entries = 7 + 1 + decisions.len(); // 6 detectors + broken + pipeline.toml, 3 tables
    assert!(
        text(&v.stdout).starts_with(&format!("ok: {} entries", entries + 3)),
        "{}",
        text(&v.stdout)
    );
    let log = std::fs::read_to_string(&audit).expect("audit");
    let mut edited: Vec<String> = log.lines().map(String::from).collect();
    edited[20] = edited[20].replace("\"block\"", "\"alert\"");
    std::fs::write(&audit, edited.join("\n") + "\n").expect("write");
    let v = rampart(&["audit", "verify", audit.to_str().expect("utf-8")]);
    assert_eq!(v.status.code(), Some(1));
    assert!(
        text(&v.stdout).contains(":21: the entry was edited"),
        "{}",
        text(&v.stdout)
    );
}

/// The tidy check: every source file opens with a `//!` line saying what it is, and is named
/// in ARCHITECTURE.md under its crate (a `mod.rs` by its folder, `lib.rs`/`main.rs` by the
/// crate's own section), so that the code map stays true as files come and go.
#[test]
fn every_source_file_is_documented_and_named_in_the_architecture() {
    let architecture = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut problems = Vec::new();
    let mut crates: Vec<PathBuf> = std::fs::read_dir(root().join("crates"))
        .expect("crates/")
        .map(|e| e.expect("entry").path())
        .collect();
    crates.sort();
    for krate in crates {
        let name = krate.file_name().expect("name").to_string_lossy().into_owned();
        let heading = format!("### `crates/{name}`");
        let Some(start) = architecture.find(&heading) else {
            problems.push(format!("ARCHITECTURE.md has no section `{heading}`"));
            continue;
        };
        let rest = &architecture[start + heading.len()..];
        let section = &rest[..rest
            .find("\n## ")
            .or_else(|| rest.find("\n### "))
            .unwrap_or(rest.len())];
        let section = &section[..section.find("\n### ").unwrap_or(section.len())];
        let src = krate.join("src");
        let mut files = Vec::new();
        let mut dirs = vec![src.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("src dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|x| x == "rs") {
                    files.push(path);
                }
            }
        }
        files.sort();
        assert!(!files.is_empty(), "{name} has source files");
        for file in files {
            let relative = file
                .strip_prefix(&src)
                .expect("under src")
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&file).expect("source");
            if !text.starts_with("//!") {
                problems.push(format!(
                    "crates/{name}/src/{relative} does not open with a `//!` line"
                ));
            }
            let named = match relative.as_str() {
                "lib.rs" | "main.rs" => true,
                r if r.ends_with("/mod.rs") => {
                    let dir = r.trim_end_matches("mod.rs");
                    section.contains(&format!("`{dir}")) || section.contains(&format!("`{r}`"))
                }
                r => section.contains(&format!("`{r}`")) || section.contains(&format!("/{r}`")),
            };
            if !named {
                problems.push(format!(
                    "crates/{name}/src/{relative} is not named in ARCHITECTURE.md's section for {name}"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
