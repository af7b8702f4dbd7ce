//! Framed postcard messages over pipes and socketpairs, shared memory and fd passing.
//!
//! pool-ipc is the transport under procpool, and knows nothing of tasks, workers or pools.
#![deny(unsafe_code)]
#![deny(missing_docs)]
