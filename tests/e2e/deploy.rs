//! The deployment files under docker/: every walstream command line in them is one the binary
//! accepts, and the Cloud Run container sequence works when run as local processes, with the
//! binary the image contains.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::harness::*;

fn docker_dir() -> PathBuf {
    workspace_root().join("docker")
}

/// Every YAML document under docker/, with its file.
fn yaml_documents() -> Vec<(PathBuf, Value)> {
    let mut documents = Vec::new();
    for path in files_under(&docker_dir()) {
        if !matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(document).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            documents.push((path.clone(), value));
        }
    }
    documents
}

/// The argument lists of every container or service whose image is walstream: Kubernetes and
/// Cloud Run `args`, compose `command` (both follow the image's `walstream` entrypoint).
fn walstream_command_lines(value: &Value, out: &mut Vec<Vec<String>>) {
    match value {
        Value::Mapping(map) => {
            let image = map.get("image").and_then(Value::as_str).unwrap_or("");
            if image.contains("walstream") {
                let args = map
                    .get("args")
                    .or_else(|| map.get("command"))
                    .and_then(Value::as_sequence)
                    .unwrap_or_else(|| panic!("walstream container without args: {map:?}"));
                out.push(args.iter().map(|a| a.as_str().expect("string args").to_string()).collect());
            }
            map.values().for_each(|v| walstream_command_lines(v, out));
        }
        Value::Sequence(items) => items.iter().for_each(|v| walstream_command_lines(v, out)),
        _ => {}
    }
}

/// `walstream ARGS` with WALSTREAM_CHECK_ARGS: parsed by the real parser, nothing run.
fn check_args(args: &[String]) -> std::process::Output {
    Command::new(release_bin()).env("WALSTREAM_CHECK_ARGS", "1").args(args).output().unwrap()
}

#[test]
fn every_walstream_command_line_under_docker_is_accepted() {
    let mut lines: Vec<(String, Vec<String>)> = Vec::new();
    for (path, document) in yaml_documents() {
        let mut found = Vec::new();
        walstream_command_lines(&document, &mut found);
        lines.extend(found.into_iter().map(|args| (path.display().to_string(), args)));
    }
    // The single-container entrypoint runs walstream from a shell script.
    let entrypoint = docker_dir().join("example-app/entrypoint.sh");
    for line in std::fs::read_to_string(&entrypoint).unwrap().lines() {
        let words = shlex::split(line.trim()).unwrap();
        let words: Vec<String> = words.into_iter().skip_while(|w| w == "exec").collect();
        if words.first().is_some_and(|w| w == "walstream") {
            let args = words[1..]
                .iter()
                .map(|w| w.replace("$DB_PATH", "/data/app.db").replace("$REPLICA_URL", "gcs://b/app.db"))
                .collect();
            lines.push((entrypoint.display().to_string(), args));
        }
    }
    let count = |file: &str| lines.iter().filter(|(path, _)| path.ends_with(file)).count();
    assert_eq!(
        (
            count("cloudrun/service.yaml"),
            count("k8s/deployment.yaml"),
            count("/compose.yaml"),
            count("compose.production.yaml"),
            count("entrypoint.sh")
        ),
        (2, 2, 2, 2, 2),
        "{lines:?}"
    );
    for (path, args) in &lines {
        let output = check_args(args);
        assert!(
            output.status.success(),
            "{path}: walstream {args:?} is rejected: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(String::from_utf8_lossy(&output.stdout).starts_with("ok: "), "{path}: {args:?}");
    }
    // The check can fail: a flag walstream does not have is refused.
    let output = check_args(&["restore".into(), "-if-db-exists".into(), "-o".into(), "/d".into(), "file:///r".into()]);
    assert_eq!(output.status.code(), Some(2));
}

/// The Cloud Run container `name` as the shipped service.yaml declares it.
fn cloud_run_container(name: &str) -> Value {
    let (_, service) = yaml_documents().into_iter().find(|(path, _)| path.ends_with("cloudrun/service.yaml")).unwrap();
    let containers = service["spec"]["template"]["spec"]["containers"].as_sequence().unwrap();
    containers
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
        .clone()
}

/// The args of the Cloud Run container `name`, with the bucket, the volume and the probe ports
/// pointed at this test's.
fn cloud_run_args(name: &str, replica: &str, data: &Path, ready_addr: &str, metrics_addr: &str) -> Vec<String> {
    cloud_run_container(name)["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("gcs://BUCKET/app.db", replica)
                .replace("/data/", &format!("{}/", data.display()))
                .replace("0.0.0.0:8081", ready_addr)
        })
        .map(|a| if a == ":9090" { metrics_addr.to_string() } else { a })
        .collect()
}

fn spawn(program: &Path, args: &[String], log: &Path, env: &[(&str, String)]) -> Child {
    with_emulator(&mut Command::new(program))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn http(port: u16, method: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "{method} / HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    response.rsplit("\r\n\r\n").next().unwrap().trim().to_string()
}

fn terminate(mut child: Child, what: &str, log: &Path) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "{what} ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{what} exited {status}: {}", std::fs::read_to_string(log).unwrap_or_default());
}

/// One Cloud Run instance: restore → (probe passes) → app and replicate → `posts` POSTs →
/// SIGTERM to every container. Returns the app's count before the posts.
fn run_instance(scratch: &Scratch, name: &str, posts: usize) -> (PathBuf, String) {
    let data = scratch.path(name);
    std::fs::create_dir_all(&data).unwrap();
    let replica = scratch.replica_url();
    let ready_port = free_port();
    let ready_addr = format!("127.0.0.1:{ready_port}");
    let bin = release_bin();
    let log = |c: &str| scratch.path(&format!("{name}-{c}.log"));

    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let args = |container| cloud_run_args(container, &replica, &data, &ready_addr, &metrics_addr);
    let restore = spawn(&bin, &args("restore"), &log("restore"), &[]);
    wait_until(Duration::from_secs(60), "the restore container's startup probe", || {
        TcpStream::connect(&ready_addr).is_ok()
    });

    // container-dependencies: only now do app and replicate start.
    let app_port = free_port();
    let db = data.join("app.db");
    let app = spawn(
        Path::new("python3"),
        &[docker_dir().join("example-app/app.py").display().to_string()],
        &log("app"),
        &[("DB_PATH", db.display().to_string()), ("PORT", app_port.to_string())],
    );
    let replicate = spawn(&bin, &args("replicate"), &log("replicate"), &[]);
    wait_until(Duration::from_secs(30), "the app to listen", || TcpStream::connect(("127.0.0.1", app_port)).is_ok());
    let before = http(app_port, "GET");
    for _ in 0..posts {
        http(app_port, "POST");
    }
    // The replicate container's liveness probe, as the manifest declares it, passes.
    let probe = &cloud_run_container("replicate")["livenessProbe"]["httpGet"];
    assert_eq!(probe["port"].as_u64(), Some(9090), "the probe's port is the one -addr serves");
    let path = probe["path"].as_str().unwrap();
    wait_until(Duration::from_secs(10), "the replicate container's liveness probe", || {
        crate::emulator::request_on(&metrics_addr, "GET", path, None).is_ok_and(|(status, _)| status == 200)
    });
    // Scale-down: every container gets SIGTERM.
    terminate(app, "app", &log("app"));
    terminate(replicate, "replicate", &log("replicate"));
    terminate(restore, "restore", &log("restore"));
    (db, before)
}

#[test]
fn cloud_run_containers_in_sequence_keep_the_data_across_instances() {
    let scratch = Scratch::on(Backend::Gcs);
    let (first_db, before) = run_instance(&scratch, "instance-1", 25);
    assert_eq!(before, "0", "a new service starts empty (no backup yet: -if-replica-exists)");
    let (second_db, before) = run_instance(&scratch, "instance-2", 5);
    assert_eq!(before, "25", "the second instance starts from the first one's data");
    assert_eq!(dump(&first_db)[0].1.len() + 5, dump(&second_db)[0].1.len());
    let restored = scratch.path("after.db");
    restore(&scratch.replica_url(), &restored);
    assert_same_database(&second_db, &restored);
}

/// The Kubernetes manifest against the published schemas of every version its native sidecar
/// runs on, strictly (an unknown field is an error), with `kubernetes-validate` from PyPI in the
/// project's venv (scripts/install-tools.sh puts it there).
#[test]
fn the_kubernetes_manifest_passes_the_published_schemas_of_1_29_to_1_37() {
    let tool = workspace_root().join(".tools/venv/bin/kubernetes-validate");
    assert!(tool.exists(), "{} is missing: run scripts/install-tools.sh", tool.display());
    let validate = |path: &Path, version: &str| {
        Command::new(&tool).args(["--strict", "--quiet", "-k", version]).arg(path).output().unwrap()
    };
    let manifest = docker_dir().join("k8s/deployment.yaml");
    for minor in 29..=37 {
        let version = format!("1.{minor}.0");
        let output = validate(&manifest, &version);
        assert!(
            output.status.success(),
            "{version}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The check can fail: a misspelt field is refused.
    let scratch = tempfile::tempdir().unwrap();
    let broken = scratch.path().join("deployment.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("restartPolicy: Always"));
    std::fs::write(&broken, text.replace("restartPolicy: Always", "restartPolicyy: Always")).unwrap();
    assert!(!validate(&broken, "1.29.0").status.success(), "a misspelt field must fail the schema check");
}

/// What Pod Security "restricted" requires of a pod (the Kubernetes documentation's list of its
/// controls), and what the issue asks of every container: resources, a liveness probe on the
/// replicator's `/healthz`, a size limit on the volume.
fn restricted_violations(pod: &Value) -> Vec<String> {
    let mut found = Vec::new();
    for key in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod[key].as_bool() == Some(true) {
            found.push(format!("{key} is set"));
        }
    }
    for volume in pod["volumes"].as_sequence().into_iter().flatten() {
        let name = volume["name"].as_str().unwrap_or("?");
        if !volume["hostPath"].is_null() {
            found.push(format!("volume {name} is a hostPath"));
        }
        if volume["emptyDir"].is_mapping() && volume["emptyDir"]["sizeLimit"].is_null() {
            found.push(format!("volume {name} has no sizeLimit"));
        }
    }
    let pod_context = &pod["securityContext"];
    let containers = ["initContainers", "containers"].iter().flat_map(|k| pod[*k].as_sequence().into_iter().flatten());
    for container in containers {
        let name = container["name"].as_str().unwrap_or("?");
        let context = &container["securityContext"];
        let either = |key: &str| if context[key].is_null() { &pod_context[key] } else { &context[key] };
        if either("runAsNonRoot").as_bool() != Some(true) {
            found.push(format!("{name}: runAsNonRoot is not true"));
        }
        if either("runAsUser").as_u64() == Some(0) {
            found.push(format!("{name}: runs as user 0"));
        }
        if !matches!(either("seccompProfile")["type"].as_str(), Some("RuntimeDefault" | "Localhost")) {
            found.push(format!("{name}: no RuntimeDefault or Localhost seccompProfile"));
        }
        if context["allowPrivilegeEscalation"].as_bool() != Some(false) {
            found.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        if context["privileged"].as_bool() == Some(true) {
            found.push(format!("{name}: privileged"));
        }
        let capabilities = &context["capabilities"];
        if !capabilities["drop"].as_sequence().is_some_and(|d| d.iter().any(|c| c.as_str() == Some("ALL"))) {
            found.push(format!("{name}: capabilities do not drop ALL"));
        }
        for added in capabilities["add"].as_sequence().into_iter().flatten() {
            if added.as_str() != Some("NET_BIND_SERVICE") {
                found.push(format!("{name}: adds capability {added:?}"));
            }
        }
        if container["resources"]["requests"].is_null() && container["resources"]["limits"].is_null() {
            found.push(format!("{name}: no resources"));
        }
        let args: Vec<&str> = container["args"].as_sequence().into_iter().flatten().filter_map(Value::as_str).collect();
        if args.first() == Some(&"replicate") {
            let addr = args.iter().position(|a| *a == "-addr").and_then(|i| args.get(i + 1));
            let probe = &container["livenessProbe"]["httpGet"];
            let port_name = probe["port"].as_str();
            let port = container["ports"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|p| p["name"].as_str() == port_name)
                .and_then(|p| p["containerPort"].as_u64());
            let serves = addr.zip(port).is_some_and(|(addr, port)| addr.ends_with(&format!(":{port}")));
            if probe["path"].as_str() != Some("/healthz") || !serves {
                found.push(format!("{name}: no liveness probe on the /healthz its -addr serves ({addr:?}, {port:?})"));
            }
        }
    }
    found
}

#[test]
fn the_kubernetes_pod_meets_pod_security_restricted_with_resources_and_probes() {
    let (_, deployment) = yaml_documents()
        .into_iter()
        .find(|(path, d)| path.ends_with("k8s/deployment.yaml") && d["kind"].as_str() == Some("Deployment"))
        .expect("a Deployment in docker/k8s/deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let violations = restricted_violations(pod);
    assert!(violations.is_empty(), "docker/k8s/deployment.yaml: {violations:#?}");
    // The check can fail: the manifest as it was before this test.
    let mut loose = pod.clone();
    loose["securityContext"]["seccompProfile"] = Value::Null;
    for container in loose["initContainers"].as_sequence_mut().unwrap() {
        container["securityContext"] = Value::Null;
        container["livenessProbe"] = Value::Null;
    }
    let violations = restricted_violations(&loose);
    for expected in ["restore: allowPrivilegeEscalation is not false", "replicate: no liveness probe"] {
        assert!(violations.iter().any(|v| v.starts_with(expected)), "{expected} not found in {violations:#?}");
    }
}
