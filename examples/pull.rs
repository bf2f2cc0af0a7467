//! Pulls one image into a cache directory: `pull CACHE_DIR SOURCE [--checksum ALGO:HEX]
//! [--insecure] [--arch ARCH] [--quiet]`. Used by scripts/bench-download.sh.

use nox::image::{Cache, Progress, PullOptions, Source, parse_checksum, parse_source};
use nox::model::ident::Arch;
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage =
        "usage: pull CACHE_DIR SOURCE [--checksum ALGO:HEX] [--insecure] [--arch ARCH] [--quiet]";
    let dir = args.next().ok_or(usage)?;
    let src = args.next().ok_or(usage)?;
    let (mut checksum, mut insecure, mut arch, mut quiet) =
        (None, false, Arch::host()?.as_str().to_string(), false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--checksum" => checksum = Some(parse_checksum(&args.next().ok_or(usage)?)?),
            "--insecure" => insecure = true,
            "--arch" => arch = args.next().ok_or(usage)?,
            "--quiet" => quiet = true,
            _ => return Err(usage.into()),
        }
    }
    let mut source = parse_source(&src, &arch)?;
    if let Source::Url {
        checksum: c,
        insecure: i,
        ..
    } = &mut source
    {
        *c = checksum;
        *i = insecure;
    }
    let cache = Cache::open(std::path::Path::new(&dir))?;
    let opts = PullOptions {
        progress: if quiet {
            Progress::None
        } else {
            Progress::Auto
        },
        ..PullOptions::default()
    };
    let t = Instant::now();
    let img = cache.pull(&source, &opts).await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{} {} {} bytes {:.3}s {:.1} MiB/s",
        img.digest,
        img.path.display(),
        img.size,
        secs,
        img.size as f64 / secs / 1048576.0
    );
    Ok(())
}
