//! The config file in restore and the listing commands: the same `litestream.yml` keys, the
//! database path instead of a URL, and errors that name the file and the key.

use std::process::Command;
use std::time::Duration;

use crate::harness::*;

/// `walstream ARGS` with extra environment variables.
fn walstream_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    with_emulator(&mut Command::new(walstream_bin())).envs(env.iter().copied()).args(args).output().unwrap()
}

on_both_backends! {
    fn restore_and_list_by_database_path_from_a_litestream_config(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut app = App::open(&scratch.db());
        let replicator = scratch.start_replicator();
        app.insert(300);
        replicator.stop_ok();

        // The database the config names is where a pod's init container restores to. Its
        // replicas: an empty one (no backup yet) and the real one, through ${VARS}.
        let target = scratch.path("pod/app.db");
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let config = scratch.path("litestream.yml");
        std::fs::write(&config, format!(
            "dbs:\n  - path: {}\n    replicas:\n      - name: empty\n        type: file\n        path: {}\n      - name: primary\n        url: ${{REPLICA_URL}}\n",
            target.display(),
            scratch.path("empty-replica").display(),
        )).unwrap();
        let env = [("REPLICA_URL", scratch.replica_url())];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (config_arg, target_arg) = (config.to_str().unwrap(), target.to_str().unwrap());

        let output = walstream_env(&["databases", "-config", config_arg], &env);
        assert!(output.status.success(), "{}", stderr(&output));
        let lines: Vec<Vec<String>> = stdout(&output).lines().map(|l| l.split_whitespace().map(str::to_string).collect()).collect();
        assert_eq!(lines, [vec!["path".to_string(), "replicas".into()], vec![target_arg.to_string(), "empty,primary".into()]]);

        let output = walstream_env(&["generations", "-config", config_arg, target_arg], &env);
        assert!(output.status.success(), "{}", stderr(&output));
        let rows: Vec<String> = stdout(&output).lines().skip(1).map(str::to_string).collect();
        assert_eq!(rows.len(), 1, "{}", stdout(&output));
        assert!(rows[0].starts_with("primary "), "replicas are listed by their configured name: {}", rows[0]);

        // No -o: the database path itself; the empty replica loses to the one with a backup.
        let output = walstream_env(&["restore", "-if-db-not-exists", "-config", config_arg, target_arg], &env);
        assert!(output.status.success(), "{}", stderr(&output));
        assert_same_database(&scratch.db(), &target);
        let output = walstream_env(&["restore", "-if-db-not-exists", "-config", config_arg, target_arg], &env);
        assert!(stderr(&output).contains("database already exists, skipping"), "{}", stderr(&output));

        // Only the empty replica: nothing to restore, which -if-replica-exists allows.
        let elsewhere = scratch.path("elsewhere.db");
        let output = walstream_env(&["restore", "-config", config_arg, "-replica", "empty", "-o", elsewhere.to_str().unwrap(), target_arg], &env);
        assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
        let output = walstream_env(&["restore", "-config", config_arg, "-replica", "empty", "-if-replica-exists", "-o", elsewhere.to_str().unwrap(), target_arg], &env);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert!(!elsewhere.exists());

        // LITESTREAM_CONFIG is honoured when -config is not given.
        let mut env_with_config = env.clone();
        env_with_config.push(("LITESTREAM_CONFIG", config_arg));
        let output = walstream_env(&["snapshots", target_arg], &env_with_config);
        assert!(output.status.success() && stdout(&output).lines().count() == 2, "{}{}", stdout(&output), stderr(&output));
    }
}

#[test]
fn config_errors_name_the_file_and_key_and_exit_12() {
    let scratch = Scratch::new();
    let config = scratch.path("walstream.yml");
    let (config_arg, out) = (config.to_str().unwrap(), scratch.path("out.db"));
    let out_arg = out.to_str().unwrap();
    let case = |args: &[&str], want: &str| {
        let output = walstream(args);
        assert_eq!(output.status.code(), Some(12), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(want), "{args:?}: {}", stderr(&output));
        assert_eq!(stderr(&output).trim().lines().count(), 1, "one line: {}", stderr(&output));
    };
    case(&["restore", "-config", config_arg, "-o", out_arg, "/data/app.db"], "config file not found");
    std::fs::write(
        &config,
        "dbs:\n  - path: /data/app.db\n    replicas:\n      - url: file:///r\n        retention: forever\n",
    )
    .unwrap();
    case(&["databases", "-config", config_arg], "dbs[0].replicas[0].retention: invalid duration \"forever\"");
    std::fs::write(&config, "dbs:\n  - path: /data/app.db\n    replicas:\n      - url: file:///r\n").unwrap();
    case(
        &["restore", "-config", config_arg, "-o", out_arg, "/data/other.db"],
        "database not found in config: /data/other.db",
    );
    case(
        &["wal", "-config", config_arg, "-replica", "gcs", "/data/app.db"],
        "replica \"gcs\" not found for database \"/data/app.db\"",
    );
    case(
        &["restore", "-config", config_arg, "-o", out_arg, "file:///r"],
        "cannot specify a replica URL and the -config flag",
    );
    let output = walstream(&["restore", "file:///r"]);
    assert!(stderr(&output).contains("output path required"), "{}", stderr(&output));
    assert!(!out.exists());
}

on_both_backends! {
    fn one_process_replicates_every_database_of_the_config(backend: Backend) {
        let scratch = Scratch::on(backend);
        let (first, second) = (scratch.db(), scratch.path("second.db"));
        // The second database's replica lives beside the first one's, under its own path.
        let second_url = match &scratch.bucket {
            Some(_) => scratch.replica_url().replace("/apps/db", "/apps/second"),
            None => format!("file://{}", scratch.path("replica-second").display()),
        };
        let config = scratch.path("walstream.yml");
        std::fs::write(&config, format!(
            "dbs:\n  - path: {}\n    replicas:\n      - url: {}\n  - path: {}\n    meta-path: {}\n    replicas:\n      - name: backup\n        url: {second_url}\n",
            first.display(), scratch.replica_url(), second.display(), scratch.path("second-meta").display(),
        )).unwrap();
        let (mut app1, mut app2) = (App::open(&first), App::open(&second));
        let replicator = Replicator::start_args(&["-config".into(), config.clone().into()], scratch.path("replicate.log"), &[]);
        for _ in 0..40 {
            app1.insert(5);
            app2.insert(3);
        }
        app2.checkpoint("TRUNCATE");
        app2.insert(7);
        replicator.stop_ok();
        assert!(scratch.path("second-meta").is_dir(), "meta-path is used for the second database");
        for (db, name) in [(&first, "restored-1.db"), (&second, "restored-2.db")] {
            let out = scratch.path(name);
            let output = walstream(&["restore", "-config", config.to_str().unwrap(), "-o", out.to_str().unwrap(), db.to_str().unwrap()]);
            assert!(output.status.success(), "{}", stderr(&output));
            assert_same_database(db, &out);
        }
        let output = walstream(&["config", "check", "-config", config.to_str().unwrap()]);
        assert!(output.status.success() && stdout(&output).contains("ok, 2 databases, 2 replicas"), "{}{}", stdout(&output), stderr(&output));
    }
}

/// Every line of `text` as a JSON object with a Cloud Logging severity and a message.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|line| {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(
                ["DEBUG", "INFO", "WARNING", "ERROR"].contains(&value["severity"].as_str().unwrap_or("")),
                "{line}"
            );
            assert!(value["message"].is_string() && value["time"].is_string(), "{line}");
            value
        })
        .collect()
}

#[test]
fn logs_are_json_lines_with_a_severity_when_asked() {
    let scratch = Scratch::new();
    // URL mode: WALSTREAM_LOG_FORMAT.
    let output = walstream_env(
        &["restore", "-o", scratch.path("out.db").to_str().unwrap(), &scratch.replica_url()],
        &[("WALSTREAM_LOG_FORMAT", "json")],
    );
    assert_eq!(output.status.code(), Some(3));
    let lines = json_lines(&stderr(&output));
    assert!(
        lines
            .iter()
            .any(|l| l["severity"] == "ERROR" && l["message"].as_str().unwrap().contains("no matching backups found")),
        "{lines:?}"
    );

    // Config mode: logging.type json, level debug, and the daemon logs to stdout unless
    // logging.stderr, as Litestream does.
    let config = scratch.path("walstream.yml");
    std::fs::write(
        &config,
        format!(
            "logging:\n  type: json\n  level: debug\ndbs:\n  - path: {}\n    replicas:\n      - url: {}\n",
            scratch.db().display(),
            scratch.replica_url()
        ),
    )
    .unwrap();
    let mut app = App::open(&scratch.db());
    app.insert(10);
    // Files, not pipes: nobody reads a pipe until the end, and debug logs could fill it.
    let (out_log, err_log) = (scratch.path("stdout.log"), scratch.path("stderr.log"));
    let mut child = with_emulator(&mut Command::new(walstream_bin()))
        .args(["replicate", "-config", config.to_str().unwrap()])
        .stdout(std::fs::File::create(&out_log).unwrap())
        .stderr(std::fs::File::create(&err_log).unwrap())
        .spawn()
        .unwrap();
    wait_for_snapshot(&scratch);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let (out, err) = (std::fs::read_to_string(&out_log).unwrap(), std::fs::read_to_string(&err_log).unwrap());
    assert!(status.success(), "{err}");
    let lines = json_lines(&out);
    assert!(lines.iter().any(|l| l["message"].as_str().unwrap().ends_with(" started")), "{lines:?}");
    assert!(lines.iter().any(|l| l["severity"] == "DEBUG"), "logging.level: debug shows debug lines");
    assert!(err.is_empty(), "the daemon logs to stdout: {err}");
    scratch.assert_restores_source();
}

/// A misspelt key is an error naming it and the key meant (Litestream ignores it and runs with
/// the default: #1403); `age:` is refused rather than uploaded in the clear; a Litestream key
/// walstream has no use for is accepted with a warning saying why.
#[test]
fn unknown_keys_fail_naming_the_nearest_valid_one() {
    let scratch = Scratch::new();
    let config = scratch.write_config(&["retension: 1h"]);
    for args in [
        &["config", "check", "-config", config.to_str().unwrap()][..],
        &["replicate", "-config", config.to_str().unwrap()],
    ] {
        let output = walstream(args);
        assert_eq!(output.status.code(), Some(12), "{args:?}: {}", stderr(&output));
        let line = format!("{}{}", stdout(&output), stderr(&output));
        assert!(
            line.contains("dbs[0].replicas[0].retension: unknown key; did you mean retention?"),
            "{args:?}: {line}"
        );
        assert!(!scratch.path(".app.db-walstream").exists(), "nothing started");
    }
    // A misspelt age key is named too (an age block that works is encryption.rs's).
    let config = scratch
        .write_config(&["age:", "  recipient: [age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p]"]);
    let output = walstream(&["config", "check", "-config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(12), "{}", stderr(&output));
    assert!(stderr(&output).contains("age.recipient: unknown key; did you mean recipients?"), "{}", stderr(&output));

    let config = scratch.write_config(&["region: us-east-1"]);
    let output = walstream(&["config", "check", "-config", config.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("region: ignored"), "the ignored key is named: {}", stderr(&output));
    // validation-interval is honoured now, so it is not warned about.
    let config = scratch.write_config(&["validation-interval: 6h"]);
    let output = walstream(&["config", "check", "-config", config.to_str().unwrap()]);
    assert!(output.status.success() && !stderr(&output).contains("ignored"), "{}", stderr(&output));
}

/// Litestream 0.5's directory entry (`dir`, `pattern`, `recursive`, one `replica`): every SQLite
/// database under the directory that matches is replicated under the replica URL plus its path
/// relative to the directory; a file of the pattern that is not SQLite is left alone. Each
/// restores from its own URL, one of them by litestream v0.3.13, and `databases` lists them.
#[test]
fn a_directory_entry_replicates_each_matching_database_under_its_relative_path() {
    let scratch = Scratch::new();
    let tenants = scratch.path("tenants");
    let mut apps = Vec::new();
    for rel in ["acme.db", "enterprise/globex.db", "trial/deeper/initech.db"] {
        let path = tenants.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut app = App::open(&path);
        app.insert(20);
        apps.push((rel, path, app));
    }
    std::fs::write(tenants.join("notes.db"), "not a database").unwrap();
    let replica_root = scratch.path("replica");
    let config = scratch.path("dir.yml");
    std::fs::write(
        &config,
        format!(
            "dbs:\n  - dir: {}\n    pattern: \"*.db\"\n    recursive: true\n    replica:\n      url: file://{}\n",
            tenants.display(),
            replica_root.display()
        ),
    )
    .unwrap();
    let listed = walstream(&["databases", "-config", config.to_str().unwrap()]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    for (rel, path, _) in &apps {
        assert!(stdout(&listed).contains(&path.display().to_string()), "{rel} not listed:\n{}", stdout(&listed));
    }
    assert!(!stdout(&listed).contains("notes.db"), "a file that is not SQLite was listed:\n{}", stdout(&listed));
    let replicator = Replicator::start_args(&["-config".into(), config.into()], scratch.path("replicate.log"), &[]);
    for (_, _, app) in &mut apps {
        app.insert(30);
    }
    std::thread::sleep(Duration::from_millis(500));
    replicator.stop_ok();
    assert!(!replica_root.join("notes.db").exists(), "a file that is not SQLite was replicated");
    for (i, (rel, path, _)) in apps.iter().enumerate() {
        let url = format!("file://{}/{rel}", replica_root.display());
        let out = scratch.path(&format!("restored-{i}.db"));
        if i == 0 {
            let output = Command::new(litestream_bin()).args(["restore", "-o"]).arg(&out).arg(&url).output().unwrap();
            assert!(output.status.success(), "litestream restore of {url}: {}", stderr(&output));
        } else {
            restore(&url, &out);
        }
        assert_same_database(path, &out);
    }
}

/// `watch: true`: a database created after start, in a subdirectory made after start, is
/// replicated within seconds (file events, not a poll); a database deleted is stopped and its
/// local state removed, and its replica keeps every commit shipped before; a file of the
/// pattern that is not SQLite is logged and left while the rest go on.
#[test]
fn a_watched_directory_follows_databases_created_and_deleted_after_start() {
    let scratch = Scratch::new();
    let tenants = scratch.path("tenants");
    std::fs::create_dir_all(&tenants).unwrap();
    let first = tenants.join("first.db");
    let mut first_app = App::open(&first);
    first_app.insert(10);
    let replica_root = scratch.path("replica");
    let config = scratch.path("watch.yml");
    std::fs::write(
        &config,
        format!(
            "dbs:\n  - dir: {}\n    pattern: \"*.db\"\n    recursive: true\n    watch: true\n    replica:\n      url: file://{}\n",
            tenants.display(),
            replica_root.display()
        ),
    )
    .unwrap();
    let listed = walstream(&["databases", "-config", config.to_str().unwrap()]);
    assert!(stdout(&listed).contains(&first.display().to_string()), "not listed:\n{}", stdout(&listed));
    let log = scratch.path("replicate.log");
    let replicator = Replicator::start_args(&["-config".into(), config.clone().into()], log.clone(), &[]);
    let url = |rel: &str| format!("file://{}/{rel}", replica_root.display());
    let holds = |rel: &str, rows: i64| {
        let probe = scratch.path("probe.db");
        let output = walstream(&["restore", "-o", probe.to_str().unwrap(), &url(rel)]);
        let ok = output.status.success() && App::open(&probe).count() == rows;
        let _ = std::fs::remove_file(&probe);
        ok
    };
    wait_until(Duration::from_secs(10), "the database there at start to be replicated", || holds("first.db", 10));
    // Restorable by its path through the config, like a database the file names.
    let by_path = scratch.path("by-path.db");
    let output = walstream(&[
        "restore",
        "-config",
        config.to_str().unwrap(),
        "-o",
        by_path.to_str().unwrap(),
        first.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(App::open(&by_path).count(), 10);

    std::fs::create_dir_all(tenants.join("team")).unwrap();
    let second = tenants.join("team/second.db");
    let mut second_app = App::open(&second);
    second_app.insert(20);
    wait_until(Duration::from_secs(10), "a database created after start to be replicated", || {
        holds("team/second.db", 20)
    });
    std::fs::write(tenants.join("notes.db"), "not a database").unwrap();

    first_app.insert(5);
    let first_rows = first_app.count();
    drop(first_app);
    wait_until(Duration::from_secs(10), "the last commits to be shipped", || holds("first.db", first_rows));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", first.display()));
    }
    wait_until(Duration::from_secs(10), "the deleted database's local state to be removed", || {
        !tenants.join(".first.db-walstream").exists()
    });
    assert!(holds("first.db", first_rows), "the deleted database's replica lost commits");

    second_app.insert(7);
    wait_until(Duration::from_secs(10), "the other database to go on", || holds("team/second.db", 27));
    replicator.stop_ok();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("not replicating this file of a watched directory"), "{text}");
    assert!(text.contains("the database was deleted"), "{text}");
    assert!(!replica_root.join("notes.db").join("generations").exists(), "a file that is not SQLite was replicated");
    let out = scratch.path("second.db");
    restore(&url("team/second.db"), &out);
    assert_same_database(&second, &out);
}
