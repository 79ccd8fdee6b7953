//! Built-in rewards.

mod command;
mod contains;
pub mod extract;
mod length;
mod matching;
mod overlong;
mod pattern;

use crate::Registry;

pub(crate) fn register_all(r: &mut Registry) {
    r.register("exact_match", |o| {
        Ok(Box::new(matching::ExactMatch::new(o)?))
    });
    r.register("numeric_match", |o| {
        Ok(Box::new(matching::NumericMatch::new(o)?))
    });
    r.register("regex", |o| Ok(Box::new(pattern::RegexReward::new(o)?)));
    r.register("length", |o| Ok(Box::new(length::Length::new(o)?)));
    r.register("overlong", |o| Ok(Box::new(overlong::Overlong::new(o)?)));
    r.register("contains", |o| Ok(Box::new(contains::Contains::new(o)?)));
    r.register("command", |o| Ok(Box::new(command::Command::new(o)?)));
}
