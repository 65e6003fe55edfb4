//! A file, re-read when it changes (Kubernetes secret volumes, Vault Agent templates).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use zeroize::Zeroize;

use crate::secret::{Secret, SecretError, SecretErrorKind, secret_from_text};
use crate::source::{FetchFuture, SecretSource};

/// The largest key file read; anything bigger is not a key file.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// Reads the key from a file, and reads it again only when the file changed.
///
/// At each fetch the path is resolved through every symlink and the target's identity is
/// compared with the last read: the resolved path, device and inode, length and
/// modification time. When any differs the file is read again; otherwise the value read
/// last time is returned without touching the contents. This is what a Kubernetes secret
/// volume needs: the kubelet writes a new timestamped directory and swaps the `..data`
/// symlink atomically, so the visible file `key -> ..data/key` resolves to a new target
/// (new path, new inode) the moment the swap happens, and is never seen half-written. An
/// editor or `mv` replacing the file changes the inode; an in-place write changes the
/// modification time or length.
///
/// Surrounding whitespace is trimmed (`echo key > file` leaves a newline). The source knows
/// no version and no creation time: the file's modification time is when the file was
/// written, not when the key was issued, so it is not reported as one.
///
/// Limitation: an in-place rewrite that keeps the length, the inode and the modification
/// time (possible only by setting the time back on purpose) is not seen.
///
/// Errors: [`SecretErrorKind::NotFound`] when the file (or a symlink target) is missing,
/// [`SecretErrorKind::Denied`] when it cannot be read, [`SecretErrorKind::Invalid`] when it
/// is empty, not UTF-8 or larger than 64 KiB, [`SecretErrorKind::Unavailable`] on other I/O
/// errors.
///
/// Reads go through `tokio::fs` (a blocking-pool thread), so a slow network filesystem does
/// not stall the runtime.
///
/// ```
/// use claude_secrets::{FileSource, SecretSource};
///
/// let source = FileSource::new("/var/run/secrets/claude/api-key");
/// assert_eq!(source.name(), "file:/var/run/secrets/claude/api-key");
/// ```
pub struct FileSource {
    path: PathBuf,
    name: String,
    last: Mutex<Option<(Identity, Secret)>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    target: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileSource {
    /// A source reading `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let name = format!("file:{}", path.display());
        Self {
            path,
            name,
            last: Mutex::new(None),
        }
    }

    /// The configured path (before symlinks are followed).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_error(&self, what: &str, e: &io::Error) -> SecretError {
        let kind = match e.kind() {
            io::ErrorKind::NotFound => SecretErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => SecretErrorKind::Denied,
            _ => SecretErrorKind::Unavailable,
        };
        SecretError::new(kind, format!("{what} {}: {e}", self.path.display()))
    }

    async fn identity(&self) -> Result<Identity, SecretError> {
        let target = tokio::fs::canonicalize(&self.path)
            .await
            .map_err(|e| self.io_error("cannot resolve", &e))?;
        let meta = tokio::fs::metadata(&target)
            .await
            .map_err(|e| self.io_error("cannot stat", &e))?;
        if !meta.is_file() {
            return Err(SecretError::new(
                SecretErrorKind::Invalid,
                format!("{} is not a regular file", self.path.display()),
            ));
        }
        #[cfg(unix)]
        let (dev, ino) = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let (dev, ino) = (0, 0);
        Ok(Identity {
            target,
            dev,
            ino,
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }

    async fn read(&self) -> Result<Secret, SecretError> {
        let id = self.identity().await?;
        {
            let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((seen, secret)) = last.as_ref()
                && *seen == id
            {
                return Ok(secret.clone());
            }
        }
        if id.len > MAX_FILE_BYTES {
            return Err(SecretError::new(
                SecretErrorKind::Invalid,
                format!(
                    "{} is {} bytes, more than a key file can be ({MAX_FILE_BYTES})",
                    self.path.display(),
                    id.len
                ),
            ));
        }
        let bytes = tokio::fs::read(&id.target)
            .await
            .map_err(|e| self.io_error("cannot read", &e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            e.into_bytes().zeroize();
            SecretError::new(
                SecretErrorKind::Invalid,
                format!("{} is not valid UTF-8", self.path.display()),
            )
        })?;
        let secret = secret_from_text(text).map(Secret::new).map_err(|e| {
            SecretError::new(
                e.kind(),
                format!("{}: {}", self.path.display(), e.message()),
            )
        })?;
        tracing::debug!(
            source = %self.name,
            target = %id.target.display(),
            fingerprint = %secret.fingerprint(),
            "key file read"
        );
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some((id, secret.clone()));
        Ok(secret)
    }
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .field("last", &last.as_ref().map(|(_, s)| s.fingerprint()))
            .finish_non_exhaustive()
    }
}

impl SecretSource for FileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(self.read())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::fs;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "claude-secrets-{tag}-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn reads_trims_and_rereads_on_change() {
        let dir = temp_dir("plain");
        let path = dir.join("key");
        fs::write(&path, "sk-one\n").unwrap();
        let s = FileSource::new(&path);
        assert_eq!(s.fetch().await.unwrap().expose_secret(), "sk-one");

        // Replaced by rename (new inode): seen.
        let tmp = dir.join("key.tmp");
        fs::write(&tmp, "sk-two\n").unwrap();
        fs::rename(&tmp, &path).unwrap();
        assert_eq!(s.fetch().await.unwrap().expose_secret(), "sk-two");

        // Rewritten in place with another length: seen.
        fs::write(&path, "sk-three").unwrap();
        assert_eq!(s.fetch().await.unwrap().expose_secret(), "sk-three");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn unchanged_identity_is_not_read_again() {
        let dir = temp_dir("same");
        let path = dir.join("key");
        fs::write(&path, "sk-aaaa").unwrap();
        let s = FileSource::new(&path);
        assert_eq!(s.fetch().await.unwrap().expose_secret(), "sk-aaaa");
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        // Same inode, same length, and the modification time set back: the contents are
        // not read again (this is the documented limitation, and proof of the caching).
        fs::write(&path, "sk-bbbb").unwrap();
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(s.fetch().await.unwrap().expose_secret(), "sk-aaaa");
        // Any change of the time: read.
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime + std::time::Duration::from_secs(1))
            .unwrap();
        assert_eq!(s.fetch().await.unwrap().expose_secret(), "sk-bbbb");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn kubernetes_symlink_swap_is_seen() {
        use std::os::unix::fs::symlink;
        let dir = temp_dir("k8s");
        // The kubelet's layout: key -> ..data/key, ..data -> ..2026_01_01_v1
        fs::create_dir(dir.join("..v1")).unwrap();
        fs::write(dir.join("..v1/key"), "sk-v1\n").unwrap();
        symlink("..v1", dir.join("..data")).unwrap();
        symlink("..data/key", dir.join("key")).unwrap();
        let s = FileSource::new(dir.join("key"));
        assert_eq!(s.fetch().await.unwrap().expose_secret(), "sk-v1");

        // New version with the same length and even the same modification time.
        fs::create_dir(dir.join("..v2")).unwrap();
        fs::write(dir.join("..v2/key"), "sk-v2\n").unwrap();
        let mtime = fs::metadata(dir.join("..v1/key"))
            .unwrap()
            .modified()
            .unwrap();
        fs::File::options()
            .write(true)
            .open(dir.join("..v2/key"))
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        // Atomic swap of ..data, as the kubelet does it.
        symlink("..v2", dir.join("..data_tmp")).unwrap();
        fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        fs::remove_dir_all(dir.join("..v1")).unwrap();
        assert_eq!(s.fetch().await.unwrap().expose_secret(), "sk-v2");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn errors_are_classified() {
        let dir = temp_dir("err");
        let s = FileSource::new(dir.join("missing"));
        assert_eq!(
            s.fetch().await.unwrap_err().kind(),
            SecretErrorKind::NotFound
        );
        fs::write(dir.join("empty"), "\n").unwrap();
        let s = FileSource::new(dir.join("empty"));
        assert_eq!(
            s.fetch().await.unwrap_err().kind(),
            SecretErrorKind::Invalid
        );
        fs::write(dir.join("binary"), [0xff, 0xfe, 0x00]).unwrap();
        let s = FileSource::new(dir.join("binary"));
        assert_eq!(
            s.fetch().await.unwrap_err().kind(),
            SecretErrorKind::Invalid
        );
        let s = FileSource::new(&dir);
        assert_eq!(
            s.fetch().await.unwrap_err().kind(),
            SecretErrorKind::Invalid
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
