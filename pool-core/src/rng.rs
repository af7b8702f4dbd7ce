//! A xorshift64 step: spread (jitter, test shuffles) without a syscall or a dependency;
//! reproducible from its seed, not secret.

/// Advances `state` (never 0) and returns its new value.
pub(crate) fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
