//! Placeholder: this front end is built by a later issue.
