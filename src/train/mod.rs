//! The built-in trainer.
pub mod model;
pub mod optim;
pub mod task;
pub mod checkpoint;
pub mod plot;
