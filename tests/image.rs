//! Image cache: local imports and overlays (qemu-img), and pulls from a real HTTP server on
//! 127.0.0.1 (tests/support/http_server.py).

use nox::image::{Cache, ImageError, create_overlay};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn prereq(ok: bool, why: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("NOX_E2E").as_deref() == Ok("require") {
        panic!("missing prerequisite: {why}");
    }
    eprintln!("skip: {why}");
    false
}

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
    create_overlay(&img, &ov, Some(1 << 30)).unwrap();
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
        create_overlay(&img, &ov, None),
        Err(ImageError::Exists(_))
    ));
    let ov2 = td.path().join("vm2.qcow2");
    assert!(matches!(
        create_overlay(&img, &ov2, Some(1 << 20)),
        Err(ImageError::Shrink { .. })
    ));
    assert!(!ov2.exists());
    create_overlay(&img, &ov2, None).unwrap();

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
