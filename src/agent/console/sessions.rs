//! Console sessions: who is signed in, each session's CSRF token, idle expiry and a bound on
//! how many are kept. Pure: the caller brings the time and the random tokens.

use std::collections::HashMap;

/// One signed-in browser.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub user: String,
    /// Sent back in `X-CSRF-Token` with every change; a page from another site cannot read it.
    pub csrf: String,
    last_seen_ms: i64,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No session, or it expired: sign in again.
    NoSession,
    /// The CSRF token is missing or wrong.
    Csrf,
}

#[derive(Debug, Clone)]
pub struct Sessions {
    by_token: HashMap<String, Session>,
    max: usize,
    idle_ms: i64,
}

impl Sessions {
    /// At most `max` sessions (the least recently used goes first), each ending after `idle_ms`
    /// without a request.
    pub fn new(max: usize, idle_ms: i64) -> Sessions {
        Sessions { by_token: HashMap::new(), max: max.max(1), idle_ms }
    }

    /// Starts a session for `user` under `token`.
    pub fn start(&mut self, token: String, user: &str, csrf: String, now_ms: i64) -> &Session {
        self.by_token.retain(|_, session| now_ms - session.last_seen_ms <= self.idle_ms);
        while self.by_token.len() >= self.max {
            let oldest =
                self.by_token.iter().min_by_key(|(_, s)| s.last_seen_ms).map(|(t, _)| t.clone()).expect("not empty");
            self.by_token.remove(&oldest);
        }
        self.by_token
            .entry(token)
            .insert_entry(Session { user: user.to_string(), csrf, last_seen_ms: now_ms })
            .into_mut()
    }

    /// The session under `token`, refreshed; an expired one is ended.
    pub fn find(&mut self, token: Option<&str>, now_ms: i64) -> Result<&Session, Refusal> {
        let token = token.ok_or(Refusal::NoSession)?;
        let expired = self.by_token.get(token).is_some_and(|s| now_ms - s.last_seen_ms > self.idle_ms);
        if expired {
            self.by_token.remove(token);
        }
        let session = self.by_token.get_mut(token).ok_or(Refusal::NoSession)?;
        session.last_seen_ms = now_ms;
        Ok(session)
    }

    /// The session under `token` if `csrf` is its token: what a change needs.
    pub fn authorise_change(
        &mut self,
        token: Option<&str>,
        csrf: Option<&str>,
        now_ms: i64,
    ) -> Result<&Session, Refusal> {
        let session = self.find(token, now_ms)?;
        match csrf {
            Some(given) if constant_time_eq(given.as_bytes(), session.csrf.as_bytes()) => Ok(session),
            _ => Err(Refusal::Csrf),
        }
    }

    pub fn end(&mut self, token: &str) {
        self.by_token.remove(token);
    }

    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }
}

/// Compares without stopping at the first difference, so the time taken does not tell how much
/// of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn sessions() -> Sessions {
        Sessions::new(2, HOUR)
    }

    #[test]
    fn a_started_session_is_found_by_its_token_only() {
        let mut sessions = sessions();
        sessions.start("t1".into(), "ana", "c1".into(), 0);
        assert_eq!(sessions.find(Some("t1"), 10).unwrap().user, "ana");
        assert_eq!(sessions.find(Some("t2"), 10), Err(Refusal::NoSession));
        assert_eq!(sessions.find(None, 10), Err(Refusal::NoSession));
    }

    #[test]
    fn a_change_needs_the_sessions_own_csrf_token() {
        let mut sessions = sessions();
        sessions.start("t1".into(), "ana", "c1".into(), 0);
        sessions.start("t2".into(), "ben", "c2".into(), 0);
        assert_eq!(sessions.authorise_change(Some("t1"), Some("c1"), 1).unwrap().user, "ana");
        assert_eq!(sessions.authorise_change(Some("t1"), Some("c2"), 1), Err(Refusal::Csrf), "another's token");
        assert_eq!(sessions.authorise_change(Some("t1"), None, 1), Err(Refusal::Csrf));
        assert_eq!(sessions.authorise_change(Some("t1"), Some(""), 1), Err(Refusal::Csrf));
        assert_eq!(sessions.authorise_change(None, Some("c1"), 1), Err(Refusal::NoSession));
    }

    #[test]
    fn an_idle_session_expires_and_use_keeps_one_alive() {
        let mut sessions = sessions();
        sessions.start("t1".into(), "ana", "c1".into(), 0);
        sessions.start("t2".into(), "ben", "c2".into(), 0);
        assert!(sessions.find(Some("t1"), HOUR).is_ok(), "used just in time");
        assert!(sessions.find(Some("t1"), 2 * HOUR).is_ok(), "an hour after its last use");
        assert_eq!(sessions.find(Some("t2"), 2 * HOUR), Err(Refusal::NoSession), "idle for two hours");
        assert_eq!(sessions.len(), 1);
    }

    #[test]
    fn beyond_the_limit_the_least_recently_used_session_ends() {
        let mut sessions = sessions();
        sessions.start("t1".into(), "ana", "c1".into(), 0);
        sessions.start("t2".into(), "ben", "c2".into(), 1);
        sessions.find(Some("t1"), 2).unwrap();
        sessions.start("t3".into(), "cat", "c3".into(), 3);
        assert_eq!(sessions.len(), 2);
        assert!(sessions.find(Some("t2"), 4).is_err());
        assert!(sessions.find(Some("t1"), 4).is_ok() && sessions.find(Some("t3"), 4).is_ok());
    }

    #[test]
    fn a_session_ends_on_request() {
        let mut sessions = sessions();
        sessions.start("t1".into(), "ana", "c1".into(), 0);
        sessions.end("t1");
        assert!(sessions.is_empty());
    }
}
