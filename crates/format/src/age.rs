//! age encryption of replica objects, as Litestream v0.3.13 does it: the LZ4 frame is encrypted
//! whole, in age's binary (not armored) format, to X25519 recipients (`age1…`), and opened with
//! X25519 identities (`AGE-SECRET-KEY-1…`). Object names do not change.
//!
//! Keys are parsed the way Go's `age.ParseRecipients` and `age.ParseIdentities` read a key
//! file, which is what Litestream calls on each configured string: one key per line, blank lines
//! and `#` comments skipped, so a string may hold a whole identity file.
//!
//! Sealing works on a buffer or as a [`Read`] over a file, so a snapshot is encrypted as it is
//! uploaded and never held whole; opening works on a buffer or as a [`Read`] over the parts of a
//! download.

use std::io::{self, Read, Write};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use age::x25519;

/// What every age file begins with: how an encrypted object is told from an LZ4 frame.
const MAGIC: &[u8] = b"age-encryption.org/";

/// age's payload chunk and the tag each chunk carries: a sealed stream's length follows from
/// its header's and the plaintext's.
const CHUNK: u64 = 64 * 1024;
const TAG: u64 = 16;

/// Whether `bytes` (an object's first bytes) are an age file.
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC) || (bytes.len() < MAGIC.len() && MAGIC.starts_with(bytes) && !bytes.is_empty())
}

/// A key that cannot be used, naming which and why.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A line that is not an X25519 recipient.
    #[error("age.recipients[{entry}] line {line}: not an age X25519 recipient (age1…): {reason}")]
    BadRecipient {
        /// Which configured string.
        entry: usize,
        /// Which line of it, from 1.
        line: usize,
        /// What the parser said.
        reason: String,
    },
    /// A line that is not an X25519 identity.
    #[error("age.identities[{entry}] line {line}: not an age X25519 identity (AGE-SECRET-KEY-1…)")]
    BadIdentity {
        /// Which configured string.
        entry: usize,
        /// Which line of it, from 1.
        line: usize,
    },
    /// A configured string with no key in it (Go's age: "no recipients found", "no secret
    /// keys found").
    #[error("age.{list}[{entry}] holds no key: only blank lines and comments")]
    Empty {
        /// `recipients` or `identities`.
        list: &'static str,
        /// Which configured string.
        entry: usize,
    },
}

/// Why a sealed object could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The replica is encrypted and no identity was configured.
    #[error("the object is age-encrypted and no age identity is configured: add the key that encrypted it to the replica's age.identities")]
    NoIdentity,
    /// None of the configured identities is one the object was encrypted to.
    #[error("none of the configured age.identities can decrypt the object: it was encrypted to other recipients")]
    NoMatchingIdentity,
    /// The object is not an age file although the replica is configured for encryption.
    #[error("the object is not age-encrypted, but the replica has an age block: it was written without encryption (remove the age block, or replicate to a new path)")]
    NotSealed,
    /// The age file is damaged: a bad header, MAC or chunk, or truncated.
    #[error("corrupt age encryption: {0}")]
    Corrupt(String),
}

impl From<age::DecryptError> for OpenError {
    fn from(e: age::DecryptError) -> OpenError {
        match e {
            age::DecryptError::NoMatchingKeys => OpenError::NoMatchingIdentity,
            other => OpenError::Corrupt(other.to_string()),
        }
    }
}

/// A replica's age keys: recipients to encrypt what it uploads, identities to decrypt what it
/// reads. Either list may be empty (a replicator that never reads needs no identity; a restore
/// needs no recipient).
#[derive(Clone, Default)]
pub struct AgeKeys {
    recipients: Vec<x25519::Recipient>,
    identities: Vec<x25519::Identity>,
}

impl std::fmt::Debug for AgeKeys {
    // Never prints a secret key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgeKeys")
            .field("recipients", &self.recipients.len())
            .field("identities", &self.identities.len())
            .finish()
    }
}

/// The keys of `entries`, one per line, blank lines and `#` comments skipped.
fn keys_in<'a>(entries: &'a [String]) -> impl Iterator<Item = (usize, usize, Option<&'a str>)> + 'a {
    entries.iter().enumerate().flat_map(|(entry, text)| {
        let lines: Vec<_> = text
            .lines()
            .enumerate()
            .map(|(n, line)| (n + 1, line.trim()))
            .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
            .collect();
        let empty = lines.is_empty().then_some((entry, 0, None));
        lines.into_iter().map(move |(line, key)| (entry, line, Some(key))).chain(empty)
    })
}

impl AgeKeys {
    /// Parses the config's `age.recipients` and `age.identities`.
    pub fn parse(recipients: &[String], identities: &[String]) -> Result<AgeKeys, KeyError> {
        let mut keys = AgeKeys::default();
        for (entry, line, key) in keys_in(recipients) {
            let key = key.ok_or(KeyError::Empty { list: "recipients", entry })?;
            let recipient = x25519::Recipient::from_str(key).map_err(|reason| KeyError::BadRecipient {
                entry,
                line,
                reason: reason.to_string(),
            })?;
            keys.recipients.push(recipient);
        }
        for (entry, line, key) in keys_in(identities) {
            let key = key.ok_or(KeyError::Empty { list: "identities", entry })?;
            let identity = x25519::Identity::from_str(key).map_err(|_| KeyError::BadIdentity { entry, line })?;
            keys.identities.push(identity);
        }
        Ok(keys)
    }

    /// Whether there is a recipient to encrypt to: uploads are sealed only then, as in Litestream.
    pub fn seals(&self) -> bool {
        !self.recipients.is_empty()
    }

    /// Whether there is an identity to decrypt with.
    pub fn opens(&self) -> bool {
        !self.identities.is_empty()
    }

    fn encryptor(&self) -> age::Encryptor {
        age::Encryptor::with_recipients(self.recipients.iter().map(|r| r as &dyn age::Recipient))
            .expect("X25519 recipients never conflict and the list is not empty")
    }

    /// `plain` encrypted to every recipient.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plain.len() + 256);
        let mut writer = self.encryptor().wrap_output(&mut out).expect("writing to memory");
        writer.write_all(plain).expect("writing to memory");
        writer.finish().expect("writing to memory");
        out
    }

    /// `plain`, `plain_len` bytes long, encrypted as it is read. The result knows its length
    /// before the first byte is read, so an upload can declare it.
    pub fn sealing_reader<R: Read>(&self, plain: R, plain_len: u64) -> SealingReader<R> {
        let out = SharedBuffer::default();
        let writer = self.encryptor().wrap_output(out.clone()).expect("writing to memory");
        let header = out.0.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        let chunks = plain_len.div_ceil(CHUNK).max(1);
        SealingReader {
            plain,
            left: plain_len,
            writer: Some(writer),
            out,
            sent: 0,
            len: header + plain_len + chunks * TAG,
        }
    }

    /// The plaintext of a sealed object.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let mut reader = self.opening_reader(sealed)?;
        let mut plain = Vec::with_capacity(sealed.len());
        reader.read_to_end(&mut plain).map_err(|e| OpenError::Corrupt(e.to_string()))?;
        Ok(plain)
    }

    /// A reader of the plaintext of the sealed stream `sealed`. Reading fails with
    /// [`io::ErrorKind::InvalidData`] where a chunk is damaged or the stream is cut short.
    pub fn opening_reader<R: Read>(&self, mut sealed: R) -> Result<impl Read, OpenError> {
        let mut head = [0u8; MAGIC.len()];
        let got = read_up_to(&mut sealed, &mut head).map_err(|e| OpenError::Corrupt(e.to_string()))?;
        if !is_sealed(&head[..got]) || got < MAGIC.len() {
            return Err(OpenError::NotSealed);
        }
        if self.identities.is_empty() {
            return Err(OpenError::NoIdentity);
        }
        let whole = io::Cursor::new(head).take(got as u64).chain(sealed);
        let decryptor = age::Decryptor::new(whole)?;
        Ok(decryptor.decrypt(self.identities.iter().map(|i| i as &dyn age::Identity))?)
    }
}

/// An object's LZ4 frame: `body` opened with `keys` when the replica has an age block, or
/// `body` itself when it has none. Either way a mismatch is an error, never a guess: a sealed
/// object without keys, or a plain one where the replica is configured for encryption.
pub fn unseal<'a>(keys: Option<&AgeKeys>, body: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, OpenError> {
    match keys {
        None if is_sealed(body) => Err(OpenError::NoIdentity),
        None => Ok(std::borrow::Cow::Borrowed(body)),
        Some(keys) => keys.open(body).map(std::borrow::Cow::Owned),
    }
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Where the encryptor writes, drained by [`SealingReader::read`]: the encryptor owns its
/// writer, so the reader keeps a second handle.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A sealed stream read from a plaintext one, a chunk at a time: what it holds is at most one
/// chunk of each.
pub struct SealingReader<R> {
    plain: R,
    /// Plaintext bytes still to come, as promised to [`AgeKeys::sealing_reader`].
    left: u64,
    writer: Option<age::stream::StreamWriter<SharedBuffer>>,
    out: SharedBuffer,
    /// Sealed bytes handed out so far.
    sent: u64,
    len: u64,
}

impl<R> SealingReader<R> {
    /// The sealed stream's whole length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the sealed stream is empty (never: an age file has a header).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<R: Read> Read for SealingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut out = self.out.0.lock().unwrap_or_else(|e| e.into_inner());
                if !out.is_empty() {
                    let n = buf.len().min(out.len());
                    buf[..n].copy_from_slice(&out[..n]);
                    out.drain(..n);
                    self.sent += n as u64;
                    return Ok(n);
                }
            }
            let Some(writer) = self.writer.as_mut() else { return Ok(0) };
            if self.left == 0 {
                self.writer.take().expect("checked above").finish()?;
                if self.sent + self.out.0.lock().unwrap_or_else(|e| e.into_inner()).len() as u64 != self.len {
                    return Err(io::Error::other("the sealed stream's length differs from the one declared"));
                }
                continue;
            }
            let mut chunk = vec![0u8; CHUNK.min(self.left) as usize];
            let got = read_up_to(&mut self.plain, &mut chunk)?;
            if got == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file being sealed shrank while it was read",
                ));
            }
            writer.write_all(&chunk[..got])?;
            self.left -= got as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (AgeKeys, AgeKeys) {
        let identity = x25519::Identity::generate();
        let recipient = identity.to_public().to_string();
        let secret = age::secrecy::ExposeSecret::expose_secret(&identity.to_string()).to_string();
        let both =
            AgeKeys::parse(std::slice::from_ref(&recipient), &[format!("# created: today\n{secret}\n")]).unwrap();
        let seal_only = AgeKeys::parse(&[recipient], &[]).unwrap();
        (both, seal_only)
    }

    #[test]
    fn a_sealed_stream_is_as_long_as_declared_and_opens_to_the_plaintext() {
        let (keys, _) = keys();
        for len in [0usize, 1, 65535, 65536, 65537, 131072, 200_000] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut reader = keys.sealing_reader(&plain[..], len as u64);
            let declared = reader.len();
            let mut sealed = Vec::new();
            reader.read_to_end(&mut sealed).unwrap();
            assert_eq!(sealed.len() as u64, declared, "plaintext of {len} bytes");
            assert!(is_sealed(&sealed));
            assert_eq!(keys.open(&sealed).unwrap(), plain);
            assert_eq!(keys.open(&keys.seal(&plain)).unwrap(), plain);
        }
    }

    #[test]
    fn opening_without_the_identity_or_a_plain_object_names_the_problem() {
        let (keys, seal_only) = keys();
        let sealed = keys.seal(b"page bytes");
        assert!(matches!(seal_only.open(&sealed), Err(OpenError::NoIdentity)));
        let (other, _) = self::keys();
        assert!(matches!(other.open(&sealed), Err(OpenError::NoMatchingIdentity)));
        assert!(matches!(keys.open(b"\x04\x22\x4d\x18 lz4"), Err(OpenError::NotSealed)));
        let mut cut = sealed.clone();
        cut.truncate(sealed.len() - 3);
        assert!(matches!(keys.open(&cut), Err(OpenError::Corrupt(_))));
    }

    #[test]
    fn bad_keys_name_the_entry_and_line() {
        let e = AgeKeys::parse(&["age1nope".into()], &[]).unwrap_err();
        assert!(e.to_string().starts_with("age.recipients[0] line 1: not an age X25519 recipient"), "{e}");
        let e = AgeKeys::parse(&[], &["# a comment\n\nAGE-SECRET-KEY-1NOPE".into()]).unwrap_err();
        assert_eq!(e.to_string(), "age.identities[0] line 3: not an age X25519 identity (AGE-SECRET-KEY-1…)");
        let e = AgeKeys::parse(&[], &["# only a comment".into()]).unwrap_err();
        assert!(e.to_string().starts_with("age.identities[0] holds no key"), "{e}");
    }
}
