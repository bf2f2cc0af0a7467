//! Image cache: local imports and overlays (qemu-img), and pulls from a real HTTP server on
//! 127.0.0.1 (tests/support/http_server.py).

use nox::image::{Cache, ImageError, create_overlay};
use nox::store::Store;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nox::testing::prereq;

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn qemu_img(args: &[&str]) {
    let st = Command::new("qemu-img").args(args).status().unwrap();
    assert!(st.success(), "qemu-img {args:?}");
}

fn make_qcow2(dir: &Path, name: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), size]);
    p
}

/// A raw disk with an MBR boot signature and some content.
fn make_raw_mbr(dir: &Path, name: &str, len: usize) -> PathBuf {
    let mut data = vec![0u8; len];
    data[510] = 0x55;
    data[511] = 0xAA;
    for (i, b) in data.iter_mut().enumerate().skip(4096).take(4096) {
        *b = (i % 251) as u8;
    }
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

#[test]
fn import_qcow2_and_raw_once() {
    if !prereq(have("qemu-img"), "qemu-img not installed") {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let cache = Cache::open(&td.path().join("images")).unwrap();
    let mode = std::fs::metadata(td.path().join("images"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);

    let q = make_qcow2(td.path(), "a.qcow2", "64M");
    let img = cache.import_file(&q, Some("mine")).unwrap();
    assert_eq!(img.format, "qcow2");
    assert_eq!(img.virtual_size, 64 << 20);
    assert_eq!(img.digest, format!("sha256:{}", sha256_file(&q)));
    assert_eq!(img.name.as_deref(), Some("mine"));
    assert_eq!(
        std::fs::metadata(&img.path).unwrap().permissions().mode() & 0o777,
        0o444
    );

    // Same path again (fast path) and a copy elsewhere (hashed): one entry.
    let again = cache.import_file(&q, None).unwrap();
    assert_eq!(again.digest, img.digest);
    let copy = td.path().join("copy.qcow2");
    std::fs::copy(&q, &copy).unwrap();
    assert_eq!(cache.import_file(&copy, None).unwrap().digest, img.digest);
    assert_eq!(cache.list().unwrap().len(), 1);

    let r = make_raw_mbr(td.path(), "b.raw", 1 << 20);
    let raw = cache.import_file(&r, None).unwrap();
    assert_eq!(raw.format, "raw");
    assert_eq!(raw.virtual_size, 1 << 20);
    assert_eq!(cache.list().unwrap().len(), 2);
    assert_eq!(cache.get(&raw.digest).unwrap(), raw);
    assert_eq!(cache.resolve("mine").unwrap().digest, img.digest);
    // Nothing left behind in tmp/.
    assert_eq!(
        std::fs::read_dir(cache.dir().join("tmp")).unwrap().count(),
        0
    );
}

#[test]
fn import_refuses_non_images() {
    if !prereq(have("qemu-img"), "qemu-img not installed") {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let cache = Cache::open(&td.path().join("images")).unwrap();
    let txt = td.path().join("notes.txt");
    std::fs::write(&txt, "hello\n".repeat(1000)).unwrap();
    let e = cache.import_file(&txt, None).unwrap_err();
    assert!(matches!(e, ImageError::NotDiskImage { .. }), "{e}");
    assert!(e.to_string().contains("notes.txt"), "{e}");
    // A qcow2 with a backing file is not a self-contained base.
    let base = make_qcow2(td.path(), "base.qcow2", "16M");
    let child = td.path().join("child.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        child.to_str().unwrap(),
    ]);
    let e = cache.import_file(&child, None).unwrap_err();
    assert!(e.to_string().contains("backing"), "{e}");
    // A vmdk is refused too.
    let vmdk = td.path().join("d.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "16M"]);
    assert!(cache.import_file(&vmdk, None).is_err());
    assert!(cache.list().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(cache.dir().join("tmp")).unwrap().count(),
        0
    );
}

#[test]
fn overlay_leaves_base_untouched() {
    if !prereq(have("qemu-img"), "qemu-img not installed") {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let cache = Cache::open(&td.path().join("images")).unwrap();
    let r = make_raw_mbr(td.path(), "b.raw", 4 << 20);
    let img = cache.import_file(&r, None).unwrap();
    let before = sha256_file(&img.path);

    let ov = td.path().join("vm1.qcow2");
    create_overlay(
        &img,
        &ov,
        Some(1 << 30),
        &nox::host::trust::Programs::default(),
    )
    .unwrap();
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&ov)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["virtual-size"], 1u64 << 30);
    assert_eq!(v["backing-filename"], img.path.to_str().unwrap());
    assert_eq!(v["backing-filename-format"], "raw");

    // Refuses to overwrite and to shrink.
    assert!(matches!(
        create_overlay(&img, &ov, None, &nox::host::trust::Programs::default()),
        Err(ImageError::Exists(_))
    ));
    let ov2 = td.path().join("vm2.qcow2");
    assert!(matches!(
        create_overlay(
            &img,
            &ov2,
            Some(1 << 20),
            &nox::host::trust::Programs::default()
        ),
        Err(ImageError::Shrink { .. })
    ));
    assert!(!ov2.exists());
    create_overlay(&img, &ov2, None, &nox::host::trust::Programs::default()).unwrap();

    if prereq(
        have("qemu-io"),
        "qemu-io not installed: no guest write test",
    ) {
        let st = Command::new("qemu-io")
            .args(["-c", "write -P 0xab 0 1M"])
            .arg(&ov)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let rd = Command::new("qemu-io")
            .args(["-c", "read -P 0xab 0 1M"])
            .arg(&ov)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&rd.stdout).contains("read 1048576/1048576"));
    }
    assert_eq!(sha256_file(&img.path), before);
    assert_eq!(
        std::fs::metadata(&img.path).unwrap().permissions().mode() & 0o777,
        0o444
    );
    // Only the overlay and the base: no temp names left beside the overlay.
    let left: Vec<_> = std::fs::read_dir(td.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn remove_refuses_image_in_use() {
    if !prereq(have("qemu-img"), "qemu-img not installed") {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let cache = Cache::open(&td.path().join("images")).unwrap();
    let q = make_qcow2(td.path(), "a.qcow2", "8M");
    let img = cache.import_file(&q, Some("base")).unwrap();
    let users = vec!["web1".to_string(), "db".to_string()];
    let e = cache.remove("base", &users, false).unwrap_err();
    assert!(matches!(e, ImageError::InUse { .. }));
    assert!(e.to_string().contains("web1, db"), "{e}");
    assert!(img.path.exists());
    let gone = cache.remove(&img.digest, &users, true).unwrap();
    assert_eq!(gone.digest, img.digest);
    assert!(!img.path.exists());
    assert!(cache.list().unwrap().is_empty());
    assert!(matches!(
        cache.remove("base", &[], false),
        Err(ImageError::NotFound(_))
    ));
    // The source record went too: a new import hashes again and recreates the entry.
    let back = cache.import_file(&q, None).unwrap();
    assert!(back.path.exists());
}

// ---------------------------------------------------------------------------------------------
// Downloads against a real HTTP server on 127.0.0.1.

use nox::image::{Checksum, HashAlgo, Progress, PullOptions, Source};
use std::io::BufRead;

const DEB_DIR: &str = "trixie/latest";
const DEB_FILE: &str = "debian-13-genericcloud-amd64.qcow2";
const UBU_DIR: &str = "releases/24.04/release";
const UBU_FILE: &str = "ubuntu-24.04-server-cloudimg-amd64.img";

struct Server {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(dir: &Path, extra: &[&str]) -> Server {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/http_server.py");
        let log = dir.with_extension("log");
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--dir")
            .arg(dir)
            .arg("--log")
            .arg(&log)
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap();
        Server { child, port, log }
    }
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
    /// Logged requests for paths ending in `suffix`: (range header, status).
    fn gets(&self, suffix: &str) -> Vec<(String, String)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.len() == 4 && f[1].ends_with(suffix))
                    .then(|| (f[2].to_string(), f[3].to_string()))
            })
            .collect()
    }
}

fn have_python() -> bool {
    Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn hash_file(tool: &str, p: &Path) -> String {
    let out = Command::new(tool).arg(p).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

/// Serves a qcow2 of `mib` MiB of incompressible data in Debian's and Ubuntu's layouts.
/// Returns (served dir, sha256, sha512) of the image.
fn mirror_tree(root: &Path, mib: usize) -> (PathBuf, String, String) {
    let raw = root.join("src.raw");
    let mut data = vec![0u8; mib << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data[510] = 0x55;
    data[511] = 0xAA;
    std::fs::write(&raw, data).unwrap();
    let srv = root.join("srv");
    std::fs::create_dir_all(srv.join(DEB_DIR)).unwrap();
    std::fs::create_dir_all(srv.join(UBU_DIR)).unwrap();
    let img = srv.join(DEB_DIR).join(DEB_FILE);
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    std::fs::hard_link(&img, srv.join(UBU_DIR).join(UBU_FILE)).unwrap();
    let s256 = hash_file("sha256sum", &img);
    let s512 = hash_file("sha512sum", &img);
    std::fs::write(
        srv.join(DEB_DIR).join("SHA512SUMS"),
        format!(
            "{}  debian-13-genericcloud-arm64.qcow2\n{s512}  {DEB_FILE}\n",
            "0".repeat(128)
        ),
    )
    .unwrap();
    std::fs::write(
        srv.join(UBU_DIR).join("SHA256SUMS"),
        format!("{s256} *{UBU_FILE}\n"),
    )
    .unwrap();
    (srv, s256, s512)
}

/// A cache under `<root>/images` whose `<root>/config.json` points the catalog at `mirror`, a
/// loopback http server that the config allows, without Ubuntu signatures (allowed too).
fn cache_with_mirror(root: &Path, mirror: &str) -> Cache {
    let entry = serde_json::json!({ "url": mirror, "allow_http": true, "unsigned": true });
    write_config(
        root,
        serde_json::json!({ "mirrors": { "debian": entry, "ubuntu": entry, "alpine": entry } }),
    )
}

fn write_config(root: &Path, config: serde_json::Value) -> Cache {
    std::fs::write(root.join("config.json"), config.to_string()).unwrap();
    Cache::for_store(&Store::at(root.to_path_buf(), root.join("run"))).unwrap()
}

fn quiet() -> PullOptions {
    PullOptions {
        progress: Progress::None,
        ..PullOptions::default()
    }
}

fn deb() -> Source {
    Source::Catalog {
        name: "debian-13".into(),
        arch: "amd64".into(),
    }
}

fn net_prereqs() -> bool {
    prereq(have("qemu-img"), "qemu-img not installed") && prereq(have_python(), "python3 missing")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn tmp_is_empty(cache: &Cache) -> bool {
    std::fs::read_dir(cache.dir().join("tmp")).unwrap().count() == 0
}

/// Runs in a child process started by `catalog_pull_through_nox_mirror` with NOX_MIRROR set
/// (env changes are not safe inside the multi-threaded test process).
#[test]
#[ignore = "child of catalog_pull_through_nox_mirror"]
fn child_pull_with_env_mirror() {
    let root = PathBuf::from(std::env::var("NOX_TEST_ROOT").unwrap());
    let cache = Cache::open(&root.join("images")).unwrap();
    // An http:// mirror from the environment is refused unless --insecure.
    let e = rt().block_on(cache.pull(&deb(), &quiet())).unwrap_err();
    assert!(matches!(e, ImageError::InsecureMirror { .. }), "{e}");
    let opts = PullOptions {
        insecure: true,
        ..quiet()
    };
    let img = rt().block_on(cache.pull(&deb(), &opts)).unwrap();
    println!("DIGEST {}", img.digest);
}

#[test]
fn catalog_pull_through_nox_mirror() {
    if !net_prereqs() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, s256, s512) = mirror_tree(td.path(), 4);
    let srv = Server::start(&srv_dir, &[]);
    let root = td.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_pull_with_env_mirror",
            "--include-ignored",
            "--nocapture",
        ])
        .env("NOX_MIRROR", srv.base())
        .env("NOX_TEST_ROOT", &root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("DIGEST sha256:{s256}")),
        "{stdout}"
    );

    let cache = Cache::open(&root.join("images")).unwrap();
    let img = cache.get(&format!("sha256:{s256}")).unwrap();
    assert_eq!(img.sha512, Some(format!("sha512:{s512}")));
    assert_eq!(img.name.as_deref(), Some("debian-13"));
    assert_eq!(img.arch.as_deref(), Some("amd64"));
    assert_eq!(img.source, format!("{}{DEB_DIR}/{DEB_FILE}", srv.base()));
    assert_eq!(img.format, "qcow2");
    assert!(!img.insecure);
    assert_eq!(
        std::fs::metadata(&img.path).unwrap().permissions().mode() & 0o777,
        0o444
    );
    assert_eq!(hash_file("sha256sum", &img.path), s256);
    assert!(tmp_is_empty(&cache));

    // Again, now through config.json: cached, so nothing is asked of the mirror.
    let cache = cache_with_mirror(&root, &srv.base());
    let again = rt().block_on(cache.pull(&deb(), &quiet())).unwrap();
    assert_eq!(again.digest, img.digest);
    assert_eq!(srv.gets(DEB_FILE).len(), 1);
    assert_eq!(srv.gets("SHA512SUMS").len(), 1);
    // A refresh reads the checksum file again and finds the same image.
    let refresh = PullOptions {
        refresh: true,
        ..quiet()
    };
    let again = rt().block_on(cache.pull(&deb(), &refresh)).unwrap();
    assert_eq!(again.digest, img.digest);
    assert_eq!(srv.gets(DEB_FILE).len(), 1);
    assert_eq!(srv.gets("SHA512SUMS").len(), 2);
}

#[test]
fn ubuntu_pull_sha256_and_url_rules() {
    if !net_prereqs() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, s256, _) = mirror_tree(td.path(), 2);
    let srv = Server::start(&srv_dir, &[]);
    let cache = cache_with_mirror(td.path(), &srv.base());
    let rt = rt();
    let ubu = Source::Catalog {
        name: "ubuntu-24.04".into(),
        arch: "amd64".into(),
    };
    let img = rt.block_on(cache.pull(&ubu, &quiet())).unwrap();
    assert_eq!(img.digest, format!("sha256:{s256}"));
    assert_eq!(img.sha512, None);

    // A URL outside the catalog needs a checksum or insecure.
    let url = format!("{}{DEB_DIR}/{DEB_FILE}", srv.base());
    let bare = Source::Url {
        url: url.clone(),
        checksum: None,
        insecure: false,
    };
    let e = rt.block_on(cache.pull(&bare, &quiet())).unwrap_err();
    assert!(matches!(e, ImageError::NeedChecksum { .. }), "{e}");
    let insecure = Source::Url {
        url: url.clone(),
        checksum: None,
        insecure: true,
    };
    let i = rt.block_on(cache.pull(&insecure, &quiet())).unwrap();
    // Same content as the Ubuntu pull: same entry.
    assert_eq!(i.digest, img.digest);
    assert_eq!(cache.list().unwrap().len(), 1);
}

#[test]
fn corrupted_download_rejected() {
    if !net_prereqs() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, _, s512) = mirror_tree(td.path(), 2);
    // Flip one byte in the served image: the published SHA-512 no longer matches.
    let img_path = srv_dir.join(DEB_DIR).join(DEB_FILE);
    let mut data = std::fs::read(&img_path).unwrap();
    let n = data.len();
    data[n / 2] ^= 0xff;
    std::fs::remove_file(srv_dir.join(UBU_DIR).join(UBU_FILE)).unwrap();
    std::fs::write(&img_path, &data).unwrap();
    let srv = Server::start(&srv_dir, &[]);
    let cache = cache_with_mirror(td.path(), &srv.base());
    let e = rt().block_on(cache.pull(&deb(), &quiet())).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ImageError::ChecksumMismatch { .. }), "{msg}");
    assert!(msg.contains(&s512), "{msg}");
    assert!(msg.contains(&hash_file("sha512sum", &img_path)), "{msg}");
    assert!(cache.list().unwrap().is_empty());
    assert!(tmp_is_empty(&cache), "partial download left behind");

    // A URL with a wrong --checksum: same refusal.
    let src = Source::Url {
        url: format!("{}{DEB_DIR}/{DEB_FILE}", srv.base()),
        checksum: Some(Checksum {
            algo: HashAlgo::Sha256,
            hex: "0".repeat(64),
        }),
        insecure: false,
    };
    let e = rt().block_on(cache.pull(&src, &quiet())).unwrap_err();
    assert!(matches!(e, ImageError::ChecksumMismatch { .. }), "{e}");
}

fn interrupted(no_range: bool) {
    if !net_prereqs() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, s256, _) = mirror_tree(td.path(), 8);
    let cut = format!("{DEB_DIR}/{DEB_FILE}:3000000");
    let mut args = vec!["--cut", cut.as_str()];
    if no_range {
        args.push("--no-range");
    }
    let srv = Server::start(&srv_dir, &args);
    let cache = cache_with_mirror(td.path(), &srv.base());
    let img = rt().block_on(cache.pull(&deb(), &quiet())).unwrap();
    assert_eq!(img.digest, format!("sha256:{s256}"));
    assert_eq!(hash_file("sha256sum", &img.path), s256);
    let gets = srv.gets(DEB_FILE);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0], ("-".to_string(), "200".to_string()));
    let (range, status) = &gets[1];
    // The retry asks for the rest; a server without Range support answers 200 and we restart.
    assert!(
        range.starts_with("bytes=") && range.ends_with('-'),
        "{gets:?}"
    );
    let resumed_at: u64 = range[6..range.len() - 1].parse().unwrap();
    assert!(resumed_at > 0 && resumed_at <= 3_000_000, "{gets:?}");
    assert_eq!(status, if no_range { "200" } else { "206" });
    assert!(tmp_is_empty(&cache));
}

#[test]
fn interrupted_transfer_resumes_with_range() {
    interrupted(false);
}

#[test]
fn interrupted_transfer_restarts_without_range() {
    interrupted(true);
}

#[test]
fn concurrent_pulls_download_once() {
    if !net_prereqs() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, s256, _) = mirror_tree(td.path(), 4);
    let srv = Server::start(&srv_dir, &["--delay", "0.3"]);
    let cache = cache_with_mirror(td.path(), &srv.base());
    let digests = rt().block_on(async {
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.pull(&deb(), &quiet()).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap().digest);
        }
        out
    });
    assert!(digests.iter().all(|d| *d == format!("sha256:{s256}")));
    assert_eq!(srv.gets(DEB_FILE).len(), 1, "{:?}", srv.gets(""));
    let sums = srv.gets("SHA512SUMS").len();
    assert!((1..=5).contains(&sums), "{sums}");
    assert_eq!(cache.list().unwrap().len(), 1);
}

#[test]
fn http_errors_name_the_url() {
    if !net_prereqs() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, _, _) = mirror_tree(td.path(), 1);
    let srv = Server::start(&srv_dir, &[]);
    let cache = cache_with_mirror(td.path(), &srv.base());
    let rt = rt();
    let missing = format!("{}nope/disk.qcow2", srv.base());
    let src = Source::Url {
        url: missing.clone(),
        checksum: None,
        insecure: true,
    };
    let e = rt.block_on(cache.pull(&src, &quiet())).unwrap_err();
    assert!(matches!(e, ImageError::Http { status: 404, .. }), "{e}");
    assert!(e.to_string().contains(&missing), "{e}");
    // debian-12 is not in the mirror: its SHA512SUMS is a 404.
    let d12 = Source::Catalog {
        name: "debian-12".into(),
        arch: "amd64".into(),
    };
    let e = rt.block_on(cache.pull(&d12, &quiet())).unwrap_err();
    assert!(e.to_string().contains("bookworm/latest/SHA512SUMS"), "{e}");
    assert!(e.to_string().contains("404"), "{e}");

    // Connection refused: a port that was just free.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/x.qcow2");
    let src = Source::Url {
        url: url.clone(),
        checksum: None,
        insecure: true,
    };
    let e = rt.block_on(cache.pull(&src, &quiet())).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&url) && msg.to_lowercase().contains("refused"),
        "{msg}"
    );
    assert!(cache.list().unwrap().is_empty());
}

#[test]
fn upstream_latest_change_keeps_old_digest() {
    if !net_prereqs() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, s256, _) = mirror_tree(td.path(), 1);
    let srv = Server::start(&srv_dir, &[]);
    let cache = cache_with_mirror(td.path(), &srv.base());
    let rt = rt();
    let old = rt.block_on(cache.pull(&deb(), &quiet())).unwrap();
    assert_eq!(old.digest, format!("sha256:{s256}"));
    // Upstream publishes a new "latest" under the same URL.
    let next = td.path().join("next");
    std::fs::create_dir_all(&next).unwrap();
    let (next_srv, n256, n512) = mirror_tree(&next, 2);
    std::fs::rename(
        next_srv.join(DEB_DIR).join(DEB_FILE),
        srv_dir.join(DEB_DIR).join(DEB_FILE),
    )
    .unwrap();
    std::fs::write(
        srv_dir.join(DEB_DIR).join("SHA512SUMS"),
        format!("{n512}  {DEB_FILE}\n"),
    )
    .unwrap();
    // Cached: no news without a refresh.
    assert_eq!(rt.block_on(cache.pull(&deb(), &quiet())).unwrap(), old);
    let refresh = PullOptions {
        refresh: true,
        ..quiet()
    };
    let new = rt.block_on(cache.pull(&deb(), &refresh)).unwrap();
    assert_eq!(new.digest, format!("sha256:{n256}"));
    assert_ne!(new.digest, old.digest);
    // The old base is still there, unchanged, for the VMs that use it.
    assert_eq!(cache.get(&old.digest).unwrap(), old);
    assert_eq!(hash_file("sha256sum", &old.path), s256);
    assert_eq!(cache.list().unwrap().len(), 2);
}

/// Runs inside `unshare -m` with its cache on a 3 MiB tmpfs (see `disk_full_is_clean`).
#[test]
#[ignore = "child of disk_full_is_clean"]
fn child_disk_full() {
    let root = PathBuf::from(std::env::var("NOX_TEST_ROOT").unwrap());
    let small = root.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::copy(root.join("config.json"), small.join("config.json")).unwrap();
    let cache = Cache::for_store(&Store::at(small.clone(), small.join("run"))).unwrap();
    let e = rt().block_on(cache.pull(&deb(), &quiet())).unwrap_err();
    assert!(matches!(e, ImageError::DiskFull { .. }), "{e}");
    assert!(e.to_string().contains("disk full"), "{e}");
    assert!(cache.list().unwrap().is_empty());
    assert!(tmp_is_empty(&cache), "partial download left on a full disk");
    println!("CHILD OK: {e}");
}

#[test]
fn disk_full_is_clean() {
    let root_ok = nix::unistd::Uid::effective().is_root();
    if !net_prereqs()
        || !prereq(root_ok, "not root: cannot mount a small tmpfs")
        || !prereq(have("unshare"), "unshare missing")
    {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, _, _) = mirror_tree(td.path(), 6);
    let srv = Server::start(&srv_dir, &[]);
    cache_with_mirror(td.path(), &srv.base());
    // A private mount namespace: the tmpfs disappears with the child, whatever happens.
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_disk_full",
            "--include-ignored",
            "--nocapture",
        ])
        .env("NOX_TEST_ROOT", td.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("CHILD OK"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn catalog_prefers_the_newest_dated_build() {
    if !net_prereqs() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, s256, _) = mirror_tree(td.path(), 2);
    // Two dated builds beside latest/, as on cloud.debian.org; the newest wins.
    for stamp in ["20250101-0001", "20260102-0002"] {
        let dir = srv_dir.join("trixie").join(stamp);
        std::fs::create_dir_all(&dir).unwrap();
        let file = format!("debian-13-genericcloud-amd64-{stamp}.qcow2");
        std::fs::hard_link(srv_dir.join(DEB_DIR).join(DEB_FILE), dir.join(&file)).unwrap();
        let s512 = hash_file("sha512sum", &dir.join(&file));
        std::fs::write(dir.join("SHA512SUMS"), format!("{s512}  {file}\n")).unwrap();
    }
    let srv = Server::start(&srv_dir, &[]);
    let cache = cache_with_mirror(td.path(), &srv.base());
    let img = rt().block_on(cache.pull(&deb(), &quiet())).unwrap();
    assert_eq!(
        img.source,
        format!(
            "{}trixie/20260102-0002/debian-13-genericcloud-amd64-20260102-0002.qcow2",
            srv.base()
        )
    );
    assert_eq!(img.digest, format!("sha256:{s256}"));
    assert!(srv.gets(DEB_FILE).is_empty(), "latest/ was not fetched");
    // A mirror with no index (404 for directories) falls back to latest/: the
    // other catalog tests cover that path.
}

// ---------------------------------------------------------------------------------------------
// Untrusted local files (issue 14 items 2 and 4).

/// The 513-byte VMDK descriptor of the issue: its extent names a FIFO, on which a `qemu-img
/// info` that guesses formats blocks forever (and which root would open). Refused from its
/// header, before qemu-img runs.
#[test]
fn vmdk_descriptor_naming_a_fifo_is_refused() {
    if !prereq(have("qemu-img"), "qemu-img not installed") {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let cache = Cache::open(&td.path().join("images")).unwrap();
    let fifo = td.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\nRW 2048 FLAT \"{}\" 0\n\nddb.virtualHWVersion = \"4\"\n",
        fifo.display()
    )
    .into_bytes();
    assert!(desc.len() < 513);
    desc.resize(513, b'\n');
    let vmdk = td.path().join("disk.vmdk");
    std::fs::write(&vmdk, &desc).unwrap();
    let e = cache.import_file(&vmdk, None).unwrap_err();
    assert!(matches!(e, ImageError::NotDiskImage { .. }), "{e}");
    assert!(e.to_string().contains("vmdk"), "{e}");
    // With a boot signature planted at offset 510 it is still not taken for raw.
    desc[510] = 0x55;
    desc[511] = 0xAA;
    std::fs::write(&vmdk, &desc).unwrap();
    let e = cache.import_file(&vmdk, None).unwrap_err();
    assert!(e.to_string().contains("vmdk"), "{e}");
    assert!(cache.list().unwrap().is_empty());
    assert!(tmp_is_empty(&cache));
}

#[test]
fn qcow2_with_backing_or_data_file_is_refused() {
    if !prereq(have("qemu-img"), "qemu-img not installed") {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let cache = Cache::open(&td.path().join("images")).unwrap();
    let fifo = td.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // A backing file that is a FIFO: qemu-img must never be pointed at it.
    let child = td.path().join("child.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        fifo.to_str().unwrap(),
        "-F",
        "raw",
        child.to_str().unwrap(),
        "16M",
    ]);
    let e = cache.import_file(&child, None).unwrap_err();
    assert!(e.to_string().contains("backing file"), "{e}");
    assert!(e.to_string().contains("fifo"), "{e}");
    // An external data file.
    let data = td.path().join("data.raw");
    let ext = td.path().join("ext.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", data.display()),
        ext.to_str().unwrap(),
        "16M",
    ]);
    let e = cache.import_file(&ext, None).unwrap_err();
    assert!(e.to_string().contains("external data file"), "{e}");
    assert!(cache.list().unwrap().is_empty());
    assert!(tmp_is_empty(&cache));
}

#[test]
fn import_refuses_links_fifos_sockets_and_devices() {
    if !prereq(have("qemu-img"), "qemu-img not installed") {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let cache = Cache::open(&td.path().join("images")).unwrap();
    let real = make_raw_mbr(td.path(), "real.raw", 1 << 20);
    let link = td.path().join("link.raw");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let e = cache.import_file(&link, None).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");

    let fifo = td.path().join("fifo.raw");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let e = cache.import_file(&fifo, None).unwrap_err();
    assert!(e.to_string().contains("FIFO"), "{e}");

    let sock = td.path().join("sock.raw");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let e = cache.import_file(&sock, None).unwrap_err();
    assert!(e.to_string().contains("socket"), "{e}");

    let e = cache.import_file(Path::new("/dev/null"), None).unwrap_err();
    assert!(e.to_string().contains("device"), "{e}");
    if prereq(
        nix::unistd::Uid::effective().is_root(),
        "not root: no block device node",
    ) {
        // loop0's numbers: opening the node works even with nothing attached.
        let blk = td.path().join("blk.raw");
        nix::sys::stat::mknod(
            &blk,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(7, 0),
        )
        .unwrap();
        let e = cache.import_file(&blk, None).unwrap_err();
        assert!(e.to_string().contains("device"), "{e}");
    }
    assert!(cache.list().unwrap().is_empty());
    // The real file imports.
    assert_eq!(cache.import_file(&real, None).unwrap().format, "raw");
}

// ---------------------------------------------------------------------------------------------
// Signed checksum files, http mirrors, bounded documents (issue 14 item 3).

/// A signing key made here; its public half is trusted only through a key file that the
/// store's config.json lists for the one mirror.
fn test_signing_key() -> pgp::composed::SignedSecretKey {
    use pgp::composed::{KeyType, SecretKeyParamsBuilder};
    SecretKeyParamsBuilder::default()
        .key_type(KeyType::Ed25519Legacy)
        .can_certify(true)
        .can_sign(true)
        .primary_user_id("nox test mirror <test@nox.invalid>".into())
        .build()
        .unwrap()
        .generate(rand08::thread_rng())
        .unwrap()
}

fn detached_sig(key: &pgp::composed::SignedSecretKey, data: &[u8]) -> Vec<u8> {
    pgp::composed::DetachedSignature::sign_binary_data(
        rand08::thread_rng(),
        &key.primary_key,
        &pgp::types::Password::empty(),
        pgp::crypto::hash::HashAlgorithm::Sha256,
        data,
    )
    .unwrap()
    .to_armored_bytes(Default::default())
    .unwrap()
}

fn ubu() -> Source {
    Source::Catalog {
        name: "ubuntu-24.04".into(),
        arch: "amd64".into(),
    }
}

#[test]
fn ubuntu_checksums_must_be_signed() {
    if !net_prereqs() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, s256, _) = mirror_tree(td.path(), 1);
    let srv = Server::start(&srv_dir, &[]);
    let key = test_signing_key();
    let public = pgp::composed::SignedPublicKey::from(key.clone());
    let key_file = td.path().join("mirror-key.asc");
    std::fs::write(
        &key_file,
        public.to_armored_bytes(Default::default()).unwrap(),
    )
    .unwrap();
    let fp = hex::encode_upper(pgp::types::KeyDetails::fingerprint(&public).as_bytes());
    let entry = |unsigned: bool| {
        serde_json::json!({ "mirrors": { "ubuntu": {
            "url": srv.base(), "allow_http": true, "unsigned": unsigned,
            "keys": [key_file.to_str().unwrap()] } } })
    };
    let cache = write_config(td.path(), entry(false));
    let rt = rt();
    let sums = srv_dir.join(UBU_DIR).join("SHA256SUMS");
    let sig = srv_dir.join(UBU_DIR).join("SHA256SUMS.gpg");

    // No signature beside the checksum file: refused, and it says how to allow it.
    let e = rt.block_on(cache.pull(&ubu(), &quiet())).unwrap_err();
    assert!(matches!(e, ImageError::Unsigned { .. }), "{e}");
    assert!(e.to_string().contains("SHA256SUMS.gpg"), "{e}");
    // A signature by the trusted key over other content: refused.
    std::fs::write(&sig, detached_sig(&key, b"something else\n")).unwrap();
    let e = rt.block_on(cache.pull(&ubu(), &quiet())).unwrap_err();
    assert!(matches!(e, ImageError::BadSignature { .. }), "{e}");
    // A good signature by a key nobody listed: refused.
    let stranger = test_signing_key();
    std::fs::write(
        &sig,
        detached_sig(&stranger, &std::fs::read(&sums).unwrap()),
    )
    .unwrap();
    let e = rt.block_on(cache.pull(&ubu(), &quiet())).unwrap_err();
    assert!(matches!(e, ImageError::BadSignature { .. }), "{e}");
    // Garbage: refused.
    std::fs::write(&sig, b"not a signature").unwrap();
    assert!(rt.block_on(cache.pull(&ubu(), &quiet())).is_err());
    assert!(cache.list().unwrap().is_empty());
    assert!(
        srv.gets(UBU_FILE).is_empty(),
        "image fetched before the signature held"
    );

    // The listed key's good signature: accepted, and recorded on the image.
    std::fs::write(&sig, detached_sig(&key, &std::fs::read(&sums).unwrap())).unwrap();
    let img = rt.block_on(cache.pull(&ubu(), &quiet())).unwrap();
    assert_eq!(img.digest, format!("sha256:{s256}"));
    assert_eq!(img.signed_by.as_deref(), Some(fp.as_str()));

    // "unsigned": true in the mirror's entry accepts a missing signature (with a warning).
    std::fs::remove_file(&sig).unwrap();
    let cache = write_config(td.path(), entry(true));
    let refresh = PullOptions {
        refresh: true,
        ..quiet()
    };
    assert_eq!(
        rt.block_on(cache.pull(&ubu(), &refresh)).unwrap().digest,
        img.digest
    );
}

#[test]
fn http_mirrors_and_oversized_documents_are_refused() {
    if !net_prereqs() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, _, _) = mirror_tree(td.path(), 1);
    let srv = Server::start(&srv_dir, &[]);
    let rt = rt();
    // A plain URL in config.json (the old form) is still read, and refused for being http.
    let cache = write_config(
        td.path(),
        serde_json::json!({ "mirror": srv.base(), "mirrors": { "ubuntu": srv.base() } }),
    );
    for src in [deb(), ubu()] {
        let e = rt.block_on(cache.pull(&src, &quiet())).unwrap_err();
        assert!(matches!(e, ImageError::InsecureMirror { .. }), "{e}");
    }
    assert!(srv.gets("").is_empty(), "{:?}", srv.gets(""));
    // A checksum file over the size cap: refused, nothing downloaded.
    let cache = cache_with_mirror(td.path(), &srv.base());
    let mut big = std::fs::read_to_string(srv_dir.join(DEB_DIR).join("SHA512SUMS")).unwrap();
    while big.len() <= 1 << 20 {
        big.push_str(&format!("{}  padding.qcow2\n", "0".repeat(128)));
    }
    std::fs::write(srv_dir.join(DEB_DIR).join("SHA512SUMS"), big).unwrap();
    let e = rt.block_on(cache.pull(&deb(), &quiet())).unwrap_err();
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
    assert!(srv.gets(DEB_FILE).is_empty());
}

/// Issue 18 item 9: an image larger than `max_image_size` is refused, whether
/// the server declares its length or not, and leaves nothing behind.
#[test]
fn oversized_images_are_refused() {
    if !net_prereqs() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, _, _) = mirror_tree(td.path(), 2);
    let rt = rt();
    for extra in [&[][..], &["--no-length"][..]] {
        let srv = Server::start(&srv_dir, extra);
        // Both servers append to one log.
        let before = srv.gets(DEB_FILE).len();
        let entry = serde_json::json!({ "url": srv.base(), "allow_http": true, "unsigned": true });
        let cache = write_config(
            td.path(),
            serde_json::json!({ "mirrors": { "debian": entry }, "max_image_size": "1M" }),
        );
        let e = rt.block_on(cache.pull(&deb(), &quiet())).unwrap_err();
        assert!(
            matches!(e, ImageError::ImageTooLarge { .. }),
            "{extra:?}: {e}"
        );
        let msg = e.to_string();
        let why = if extra.is_empty() {
            "the server declares"
        } else {
            "more than 1048576 bytes came"
        };
        assert!(msg.contains(why), "{msg}");
        assert_eq!(
            srv.gets(DEB_FILE).len(),
            before + 1,
            "not retried: {:?}",
            srv.gets(DEB_FILE)
        );
        assert!(tmp_is_empty(&cache), "a refused download is not kept");
        assert!(cache.list().unwrap().is_empty());
        // Under the cap (the default, 64 GiB) it comes.
        let cache = cache_with_mirror(td.path(), &srv.base());
        rt.block_on(cache.pull(&deb(), &quiet())).unwrap();
        std::fs::remove_dir_all(td.path().join("images")).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Offline use of cached catalog images (issue 14 item 10).

fn nox_cmd(root: &Path, args: &[&str]) -> std::process::Output {
    nox_cmd_via(root, &[], args)
}

/// `nox ARGS`, run through `wrapper` (e.g. `unshare --net --`).
fn nox_cmd_via(root: &Path, wrapper: &[&str], args: &[&str]) -> std::process::Output {
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(env!("CARGO_BIN_EXE_nox"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_nox")),
    };
    let out = cmd
        .args(args)
        .env("NOX_HOME", root)
        .env("HOME", root.join("home"))
        .env_remove("NOX_MIRROR")
        .env_remove("NOX_MIRROR_DEBIAN")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    eprintln!(
        "$ nox {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn cached_catalog_image_needs_no_network() {
    if !net_prereqs()
        || !prereq(
            nix::unistd::geteuid().is_root() && have("unshare"),
            "an empty network namespace (unshare --net) needs root and unshare",
        )
    {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, s256, _) = mirror_tree(td.path(), 1);
    // Dated builds as on the real mirror: the pull is recorded under the dated URL.
    let stamp = "20260102-0002";
    let dated = srv_dir.join("trixie").join(stamp);
    std::fs::create_dir_all(&dated).unwrap();
    let file = format!("debian-13-genericcloud-amd64-{stamp}.qcow2");
    std::fs::hard_link(srv_dir.join(DEB_DIR).join(DEB_FILE), dated.join(&file)).unwrap();
    let s512 = hash_file("sha512sum", &dated.join(&file));
    std::fs::write(dated.join("SHA512SUMS"), format!("{s512}  {file}\n")).unwrap();
    let srv = Server::start(&srv_dir, &[]);
    let root = td.path().join("store");
    std::fs::create_dir_all(&root).unwrap();
    cache_with_mirror(&root, &srv.base());

    let out = nox_cmd(&root, &["image", "pull", "debian-13", "--arch", "amd64"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&s256));
    let after_pull = srv.gets("").len();
    assert!(after_pull >= 3, "{:?}", srv.gets(""));

    // Server up: create asks it nothing.
    let create = |wrapper: &[&str], name: &str| {
        nox_cmd_via(
            &root,
            wrapper,
            &[
                "create",
                name,
                "--image",
                "debian-13",
                "--arch",
                "amd64",
                "--network",
                "user",
                "--no-start",
            ],
        )
    };
    assert!(create(&[], "web1").status.success());
    assert_eq!(srv.gets("").len(), after_pull, "{:?}", srv.gets(""));
    // Server gone, and no network at all (an empty namespace: any request
    // fails at once, loudly): create still works from the cache.
    drop(srv);
    assert!(create(&["unshare", "--net", "--"], "web2").status.success());
    // --refresh asks upstream, which is gone: a clear failure, no VM.
    let out = nox_cmd(
        &root,
        &[
            "create",
            "web3",
            "--image",
            "debian-13",
            "--arch",
            "amd64",
            "--network",
            "user",
            "--no-start",
            "--refresh",
        ],
    );
    assert!(!out.status.success());
    assert!(!root.join("vms/web3").exists());
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("vms/web2/spec.json")).unwrap()).unwrap();
    assert_eq!(spec["image"]["digest"], format!("sha256:{s256}"));
}

// ---------------------------------------------------------------------------------------------
// Alpine (issue 13 item 6): a loopback mirror laid out like dl-cdn.alpinelinux.org.

#[test]
fn alpine_catalog_from_a_mirror_laid_out_like_alpines() {
    if !net_prereqs() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (srv_dir, s256, _) = mirror_tree(td.path(), 1);
    let cloud = srv_dir.join("v3.22/releases/cloud");
    std::fs::create_dir_all(&cloud).unwrap();
    let src = srv_dir.join(DEB_DIR).join(DEB_FILE);
    // Older point releases and revisions, the other flavour and arch, and the newest amd64 one.
    for f in [
        "nocloud_alpine-3.22.2-x86_64-bios-cloudinit-r0.qcow2",
        "nocloud_alpine-3.22.9-x86_64-bios-cloudinit-r0.qcow2",
        "generic_alpine-3.22.11-x86_64-bios-cloudinit-r0.qcow2",
        "nocloud_alpine-3.22.11-aarch64-uefi-cloudinit-r0.qcow2",
        "nocloud_alpine-3.22.10-x86_64-bios-cloudinit-r1.qcow2",
    ] {
        std::fs::hard_link(&src, cloud.join(f)).unwrap();
        // Alpine's sidecar: the bare SHA-512. Only the newest amd64 one is right.
        let digest = if f.contains("3.22.10-x86_64") {
            hash_file("sha512sum", &src)
        } else {
            "0".repeat(128)
        };
        std::fs::write(cloud.join(format!("{f}.sha512")), format!("{digest}\n")).unwrap();
    }
    let srv = Server::start(&srv_dir, &[]);
    let root = td.path().join("store");
    std::fs::create_dir_all(&root).unwrap();
    cache_with_mirror(&root, &srv.base());
    let out = nox_cmd(
        &root,
        &[
            "create",
            "alp",
            "--image",
            "alpine-3.22",
            "--arch",
            "amd64",
            "--network",
            "user",
            "--no-start",
        ],
    );
    assert!(out.status.success());
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("vms/alp/spec.json")).unwrap()).unwrap();
    assert_eq!(spec["image"]["digest"], format!("sha256:{s256}"));
    assert_eq!(spec["image"]["source"], "alpine-3.22");
    let gets = srv.gets("");
    assert!(
        gets.len() == 3
            && srv
                .gets("nocloud_alpine-3.22.10-x86_64-bios-cloudinit-r1.qcow2")
                .len()
                == 1,
        "{gets:?}"
    );
    // A wrong sidecar for the newest build is a checksum mismatch, not a fallback to another.
    std::fs::write(
        cloud.join("nocloud_alpine-3.22.10-x86_64-bios-cloudinit-r1.qcow2.sha512"),
        format!("{}\n", "1".repeat(128)),
    )
    .unwrap();
    let out = nox_cmd(&root, &["image", "pull", "alpine-3.22", "--arch", "amd64"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"));
}

// ---------------------------------------------------------------------------------------------
// Leftovers and creates in progress (issue 14 item 14).

fn age(p: &Path, when: &str) {
    let st = Command::new("touch")
        .args(["-d", when])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn leftovers_of_killed_imports_and_downloads_are_cleaned() {
    use nix::fcntl::{Flock, FlockArg};
    let td = tempfile::tempdir().unwrap();
    let dir = td.path().join("images");
    let cache = Cache::open(&dir).unwrap();
    let tmp = dir.join("tmp");
    let locks = dir.join("locks");
    // A killed import: nobody holds it.
    std::fs::write(tmp.join("import-dead"), b"x").unwrap();
    // A live import: its owner holds the lock on the file.
    std::fs::write(tmp.join("import-live"), b"x").unwrap();
    let _live = Flock::lock(
        std::fs::File::open(tmp.join("import-live")).unwrap(),
        FlockArg::LockExclusive,
    )
    .unwrap();
    // Partial downloads: an old orphan, a young orphan (kept to resume), an old one in use.
    for key in ["old", "young", "busy"] {
        std::fs::write(tmp.join(format!("{key}.part")), b"x").unwrap();
        std::fs::write(tmp.join(format!("{key}.part.json")), b"{}").unwrap();
        if key != "young" {
            age(&tmp.join(format!("{key}.part")), "3 days ago");
            age(&tmp.join(format!("{key}.part.json")), "3 days ago");
        }
    }
    let busy = std::fs::File::create(locks.join("busy.lock")).unwrap();
    let _busy = Flock::lock(busy, FlockArg::LockExclusive).unwrap();
    drop(cache);
    // Opening the cache cleans.
    let cache = Cache::open(&dir).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "busy.part",
            "busy.part.json",
            "import-live",
            "young.part",
            "young.part.json"
        ]
    );
    // A prune-time clean keeps nothing that is not in use.
    let mut removed = cache.clean_tmp(std::time::Duration::ZERO).unwrap();
    removed.sort();
    assert_eq!(removed, ["young.part", "young.part.json"]);
}

#[test]
fn prune_and_rm_spare_the_base_of_a_create_in_progress() {
    if !prereq(have("qemu-img"), "qemu-img not installed") {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let root = td.path().join("store");
    std::fs::create_dir_all(&root).unwrap();
    let q = make_qcow2(td.path(), "base.qcow2", "16M");
    assert!(
        nox_cmd(
            &root,
            &["image", "import", q.to_str().unwrap(), "--name", "base"]
        )
        .status
        .success()
    );
    let cache = Cache::for_store(&Store::at(root.clone(), root.join("run"))).unwrap();
    let img = cache.resolve("base").unwrap();
    // A create half-way: its staging directory, locked, with the overlay made.
    let staging = root.join("vms/.new-web-abc123");
    std::fs::create_dir_all(&staging).unwrap();
    let held = nox::store::lock_file(&staging.join("lock"), false)
        .unwrap()
        .unwrap();
    create_overlay(
        &img,
        &staging.join("disk.qcow2"),
        None,
        &nox::host::trust::Programs::default(),
    )
    .unwrap();

    let out = nox_cmd(&root, &["image", "rm", "base"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("web (being created)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(nox_cmd(&root, &["image", "prune"]).status.success());
    assert!(
        img.path.exists(),
        "prune removed the base of a create in progress"
    );
    // The create died (lock released): its leftover is no user any more.
    drop(held);
    assert!(nox_cmd(&root, &["image", "prune"]).status.success());
    assert!(!img.path.exists());
}

/// `image prune` removes the direct-boot cache's entries no VM boots (a
/// guest could otherwise leave kernels there forever) and keeps the rest.
#[test]
fn prune_removes_extracted_kernels_no_vm_boots() {
    let td = tempfile::tempdir().unwrap();
    let root = td.path().join("store");
    let boot = root.join("images/boot");
    std::fs::create_dir_all(&boot).unwrap();
    let (used, unused) = ("a".repeat(64), "b".repeat(64));
    for key in [&used, &unused] {
        for ext in ["vmlinuz", "initrd"] {
            std::fs::write(boot.join(format!("{key}.{ext}")), vec![0u8; 4096]).unwrap();
        }
    }
    let vm = root.join("vms/web");
    std::fs::create_dir_all(&vm).unwrap();
    std::fs::write(
        vm.join("boot-cache.json"),
        format!("{{\"key\": \"{used}\", \"changes\": [1]}}"),
    )
    .unwrap();
    let out = nox_cmd(&root, &["image", "prune"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("extracted kernels no VM boots"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(boot.join(format!("{used}.vmlinuz")).exists());
    assert!(boot.join(format!("{used}.initrd")).exists());
    assert!(!boot.join(format!("{unused}.vmlinuz")).exists());
    assert!(!boot.join(format!("{unused}.initrd")).exists());
}
