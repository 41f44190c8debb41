//! A version named in a command: the source model or an adapted version's id.

/// Which version to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRef {
    Source,
    Id(i64),
}

impl std::str::FromStr for VersionRef {
    type Err = String;

    fn from_str(text: &str) -> Result<VersionRef, String> {
        match text {
            "source" | "0" => Ok(VersionRef::Source),
            other => other
                .parse::<i64>()
                .ok()
                .filter(|&id| id > 0)
                .map(VersionRef::Id)
                .ok_or_else(|| format!("'{other}' is neither 'source' nor a version number")),
        }
    }
}

impl VersionRef {
    pub fn id(self) -> i64 {
        match self {
            VersionRef::Source => 0,
            VersionRef::Id(id) => id,
        }
    }
}
