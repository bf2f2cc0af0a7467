//! The machine's shape: what of a qemu argv must be equal for a saved
//! machine state (a warm template's) to load into it. Pure.

/// What of an argv must be equal for a saved machine state to load into
/// it: the argv with every per-VM value (paths, names, MAC, descriptors,
/// forwarded ports, the generation id) replaced by `*`, `-incoming`
/// dropped, and a netdev reduced to whether it is qemu's slirp (the only
/// backend with state of its own). Pure.
pub fn machine_shape(argv: &[String]) -> Vec<String> {
    const PER_VM: [&str; 9] = [
        "path", "file", "logfile", "mac", "fd", "vhostfd", "addr.str", "hostfwd", "guid",
    ];
    let mut out = vec![];
    let mut it = argv.iter().skip(1);
    while let Some(flag) = it.next() {
        if !flag.starts_with('-') {
            out.push(flag.clone());
            continue;
        }
        let takes_value = !matches!(flag.as_str(), "-S" | "-nodefaults" | "-no-user-config");
        let Some(value) = it.next().filter(|_| takes_value) else {
            out.push(flag.clone());
            continue;
        };
        let shaped = match flag.as_str() {
            // The accelerator is checked on its own (crate::vmm::warm); its
            // options (the translation cache) are no machine state.
            "-incoming" | "-add-fd" | "-accel" => continue,
            // Where the RAM lives is not machine state (a warm clone maps
            // its template's RAM image; the template's source had plain RAM).
            "-object" if value.starts_with("memory-backend-file,") => continue,
            "-machine" => machine_shape_of(value),
            "-name" | "-kernel" | "-initrd" => "*".to_string(),
            "-netdev" if value.starts_with("user,") => "user".into(),
            "-netdev" => "other".into(),
            "-chardev" => chardev_shape(value),
            _ => split_opts(value)
                .into_iter()
                .map(|item| match item.split_once('=') {
                    Some((k, _)) if PER_VM.contains(&k) => format!("{k}=*"),
                    _ => item,
                })
                .collect::<Vec<_>>()
                .join(","),
        };
        out.push(flag.clone());
        out.push(shaped);
    }
    out
}

/// Whether a [`machine_shape`] has qemu's slirp (whose state is its own).
pub fn shape_has_slirp(shape: &[String]) -> bool {
    shape
        .windows(2)
        .any(|w| w[0] == "-netdev" && w[1] == "user")
}

/// A chardev without how it reaches the host (a path or an inherited
/// descriptor, as server or client, its log file): none of that is machine
/// state, and older nox versions gave qemu socket paths where it now gets
/// descriptors.
fn chardev_shape(value: &str) -> String {
    const ADDRESS: [&str; 5] = ["path", "fd", "server", "wait", "logfile"];
    split_opts(value)
        .into_iter()
        .filter(|item| !matches!(item.split_once('='), Some((k, _)) if ADDRESS.contains(&k)))
        .collect::<Vec<_>>()
        .join(",")
}

/// A shape recorded by an older nox, in today's terms (its chardevs
/// reduced as [`machine_shape`] now does), so its warm templates still load.
pub fn upgrade_shape(shape: &[String]) -> Vec<String> {
    let mut out: Vec<String> = shape.to_vec();
    for i in 1..out.len() {
        match out[i - 1].as_str() {
            "-chardev" => out[i] = chardev_shape(&out[i]),
            // Recorded before the accelerator left the machine's shape.
            "-machine" => out[i] = machine_shape_of(&out[i]),
            _ => {}
        }
    }
    out
}

/// `-machine` without what is not machine state: the accelerator (checked
/// on its own) and where the RAM lives (a warm clone maps its template's
/// RAM image; the template's source had plain RAM).
fn machine_shape_of(value: &str) -> String {
    split_opts(value)
        .into_iter()
        .filter(|item| !item.starts_with("memory-backend=") && !item.starts_with("accel="))
        .collect::<Vec<_>>()
        .join(",")
}

/// Splits a qemu option string at its unescaped commas (`,,` is a comma
/// inside a value, and stays `,,` in the item).
pub fn split_opts(s: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(i) = items.last_mut() {
                    i.push_str(",,");
                }
            } else {
                items.push(String::new());
            }
        } else if let Some(i) = items.last_mut() {
            i.push(c);
        }
    }
    items
}
