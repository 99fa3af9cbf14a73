//! The book in force in a process, replaced whole when a catalogue change is applied.
//!
//! Every reader takes [`LiveBook::current`] once per unit of work (a call, a writer batch) and
//! keeps that `Arc` for it, so one decision never mixes two versions. Versions only move
//! forward: a record validated under a version is rated under it or a later one, because the
//! writer reads the book after the record was queued.

use super::PriceBook;
use std::sync::{Arc, RwLock};

/// A shared handle on the book in force.
#[derive(Debug, Clone)]
pub struct LiveBook(Arc<RwLock<Arc<PriceBook>>>);

impl LiveBook {
    /// Starts with `book`.
    pub fn new(book: Arc<PriceBook>) -> Self {
        LiveBook(Arc::new(RwLock::new(book)))
    }

    /// The book in force now.
    pub fn current(&self) -> Arc<PriceBook> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts `book` in force for every reader from their next unit of work.
    pub fn replace(&self, book: Arc<PriceBook>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = book;
    }
}

impl From<Arc<PriceBook>> for LiveBook {
    fn from(book: Arc<PriceBook>) -> Self {
        LiveBook::new(book)
    }
}
