//! Formatting shared by the commands' output: words in the singular or plural, text squeezed onto one line, and
//! the progress bar of commands that wait for work to settle.

use indicatif::{ProgressBar, ProgressStyle};

/// The `s` that ends a count's noun, except for one.
pub fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `text` with every run of whitespace, line breaks included, made a single space.
pub fn squeeze(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One line of at most `max` characters.
pub fn one_line(text: &str, max: usize) -> String {
    let line = squeeze(text);
    if line.chars().count() <= max {
        return line;
    }
    let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// A bar counting `len` items (`what`, a plural noun) as they settle, with a message after it.
pub fn settling_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {what} settled  {{msg}}"
        ))
        .expect("valid template"),
    );
    bar
}
