//! Stream versions: what an append expects ([`ExpectedVersion`]) and what a refused one
//! met ([`ActualVersion`]).

use std::fmt;

/// What version an append expects the stream to be at.
///
/// Versions count from **0**: the first event of a stream has version 0, the tenth has
/// version 9. `Exact(n)` therefore means "the stream's last event has version `n`", that
/// is, the stream holds exactly `n + 1` events. The same convention holds everywhere in
/// the API: [`RecordedEvent::version`](crate::RecordedEvent::version), [`AppendResult`](crate::AppendResult), and stream reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// No check: append to the end of the stream, whatever it holds.
    Any,
    /// The stream must not exist (hold no events).
    NoStream,
    /// The stream must exist (hold at least one event).
    StreamExists,
    /// The stream's last event must have exactly this version.
    Exact(u64),
}

impl ExpectedVersion {
    /// Encodes the expectation as the (kind, version) pair the append statement takes.
    pub(crate) fn to_params(self) -> (i32, i64) {
        match self {
            ExpectedVersion::Any => (0, 0),
            ExpectedVersion::NoStream => (1, 0),
            ExpectedVersion::StreamExists => (2, 0),
            ExpectedVersion::Exact(v) => (3, v as i64),
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("an existing stream"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// The version a stream was at when an append expecting another one was refused
/// ([`Error::WrongExpectedVersion`](crate::Error::WrongExpectedVersion)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ActualVersion {
    /// The stream does not exist.
    NoStream,
    /// The stream's last event has this version.
    Exact(u64),
    /// The version could not be read without giving a wrong answer: inside a caller's
    /// transaction, a concurrent append won the race and has not committed yet (see
    /// [`Store::append_in`](crate::Store::append_in)).
    Unknown,
}

impl ActualVersion {
    /// The version as an `Option` (`None`: no stream), or `None` too when unknown.
    pub fn known(self) -> Option<Option<u64>> {
        match self {
            ActualVersion::NoStream => Some(None),
            ActualVersion::Exact(v) => Some(Some(v)),
            ActualVersion::Unknown => None,
        }
    }

    pub(crate) fn from_head(head: Option<u64>) -> ActualVersion {
        head.map_or(ActualVersion::NoStream, ActualVersion::Exact)
    }
}

impl fmt::Display for ActualVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActualVersion::NoStream => f.write_str("the stream does not exist"),
            ActualVersion::Exact(v) => write!(f, "the stream is at version {v}"),
            ActualVersion::Unknown => f.write_str(
                "a concurrent append to the stream has not committed yet, so its version \
                 is unknown",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_version_params() {
        assert_eq!(ExpectedVersion::Exact(7).to_params(), (3, 7));
        assert_eq!(ExpectedVersion::NoStream.to_string(), "no stream");
    }
}
