//! Tasks that write to their own channel: stray text, random bytes, crafted frame headers,
//! messages out of turn. The pool never hangs, holds no unbounded memory, and fails only the
//! offending worker's task.

use std::time::{Duration, Instant};

use procpool::TaskErrorKind;

use crate::util::{METHODS, builder, shut_down, square, write_to_channel};

#[test]
fn a_line_of_text_on_the_channel_fails_that_task_at_once() {
    for method in METHODS {
        let pool = builder(method).build().unwrap();
        let t = Instant::now();
        // "1234" reads as the header of an 835 MB frame.
        let e = pool
            .apply(
                write_to_channel,
                (b"1234 printed to the wrong fd\n".to_vec(),),
            )
            .unwrap_err();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{method:?}: took {:?}",
            t.elapsed()
        );
        assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{method:?}: {e}");
        let text = e.to_string();
        assert!(text.contains("stray bytes"), "{method:?}: {text}");
        // The pool killed it: no hint at the out-of-memory killer.
        assert_eq!(e.signal(), Some(9), "{text}");
        assert!(text.contains("sent by the pool"), "{text}");
        assert!(!text.contains("out-of-memory"), "{method:?}: {text}");
        assert_eq!(pool.map(square, 0..10u64).unwrap().len(), 10);
        shut_down(pool);
    }
}
