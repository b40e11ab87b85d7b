//! Saving a file so that neither a crash nor a second writer leaves a torn one: the
//! bytes go to a uniquely named temporary file beside the target, which is flushed to
//! disk and renamed over the target; then the directory is flushed, so that the
//! rename itself survives a crash. Two saves to one path each write their own
//! temporary file; the last rename wins, whole. A failed save removes its temporary
//! file and leaves the old target as it was.
//!
//! `tempfile` makes the unique name (created exclusively, so two writers never share
//! one) and removes the file on every error path.
use std::fs::File;
use std::io;
use std::path::Path;

/// Save `path` by writing its bytes to `file`, a fresh temporary file beside it.
pub fn write_with(path: &Path, write: impl FnOnce(&mut File) -> io::Result<()>) -> io::Result<()> {
    let mut tmp = temporary_beside(path)?;
    write(tmp.as_file_mut())?;
    finish(path, tmp)
}

/// Save `path` through a writer that can only write to a path of its own choosing:
/// `write` gets the temporary file's path and must leave the bytes there.
pub fn write_via_path(path: &Path, write: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<()> {
    let tmp = temporary_beside(path)?;
    write(tmp.path())?;
    finish(path, tmp)
}

fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn temporary_beside(path: &Path) -> io::Result<tempfile::NamedTempFile> {
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(directory_of(path))
}

fn finish(path: &Path, tmp: tempfile::NamedTempFile) -> io::Result<()> {
    // Reopened: a writer given only the path may have replaced the file under it.
    File::open(tmp.path())?.sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_directory(directory_of(path))
}

#[cfg(unix)]
fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_directory(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_failed_save_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        write_with(&path, |f| f.write_all(b"first")).unwrap();
        let err = write_with(&path, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        write_via_path(&path, |p| std::fs::write(p, b"second")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out.bin"]);
    }

    #[test]
    fn a_bare_file_name_saves_in_the_current_directory() {
        assert_eq!(directory_of(Path::new("ctx.fkv")), Path::new("."));
        assert_eq!(directory_of(Path::new("a/ctx.fkv")), Path::new("a"));
    }
}
