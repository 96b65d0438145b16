//! The embedded directory store (issue 2).
