//! What the running kernel's nf_tables does that decides how a batch is best written: read once
//! from the kernel's release (`/proc/sys/kernel/osrelease`), never guessed from features that
//! fail loudly.

use std::path::Path;

/// The release that first finds a set created in the same transaction by its ID in one step:
/// Linux 6.12 (c1aa38866b9c, "netfilter: nf_tables: store new sets in dedicated list"; also in
/// some stable releases before it, which are not told apart here and keep the names). Before, a
/// lookup by ID walked the whole transaction from its first message.
pub const FINDS_NEW_SETS_BY_ID: (u32, u32) = (6, 12);

/// Whether this kernel finds a set created in the same transaction by its ID at once
/// ([`FINDS_NEW_SETS_BY_ID`]). A release that cannot be read or parsed says no: naming sets as
/// nft does works on every kernel.
pub fn finds_new_sets_by_id() -> bool {
    release(Path::new("/proc/sys/kernel/osrelease"))
        .and_then(|r| version(&r))
        .is_some_and(|v| v >= FINDS_NEW_SETS_BY_ID)
}

fn release(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// `major.minor` of a release such as `6.1.0-28-amd64` or `5.15.0-105-generic`.
fn version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_is_read_as_major_and_minor_and_only_6_12_on_finds_new_sets_by_id() {
        let cases = [
            ("6.18.0-1-cloud-amd64\n", Some((6, 18)), true),
            ("6.12.0", Some((6, 12)), true),
            ("6.11.11-300.fc41.x86_64", Some((6, 11)), false),
            ("6.1.0-28-amd64", Some((6, 1)), false),
            ("5.15.0-105-generic", Some((5, 15)), false),
            ("7.0-rc1", Some((7, 0)), true),
            ("", None, false),
            ("6", None, false),
            ("linux", None, false),
        ];
        for (release, want, by_id) in cases {
            let got = version(release);
            assert_eq!(got, want, "{release:?}");
            assert_eq!(
                got.is_some_and(|v| v >= FINDS_NEW_SETS_BY_ID),
                by_id,
                "{release:?}"
            );
        }
    }

    #[test]
    fn an_unreadable_release_is_none() {
        assert_eq!(release(Path::new("/nonexistent/osrelease")), None);
    }
}
