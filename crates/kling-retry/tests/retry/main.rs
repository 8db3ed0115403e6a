//! kling-retry's behaviour: every rule in paused time against a scripted Kling, the delay
//! arithmetic as properties, and whole runs against kling-mock over real TCP.

mod support;

mod answers;
mod creates;
mod delays;
mod invariants;
mod limits;
mod mock;
mod properties;
mod rules;
