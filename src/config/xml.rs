//! A positioned XML tree and the checks shared by Rampart's configuration files.
//!
//! Every error names the file, the line and column, and what was expected; nothing in
//! here panics on any input.

use std::fmt;
use std::str::FromStr;

use quick_xml::events::Event;
use quick_xml::Reader;

/// Line and column (both from 1) of the `<` that opens an element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub pos: Option<Pos>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(pos) => write!(
                f,
                "{}:{}:{}: {}",
                self.file, pos.line, pos.column, self.message
            ),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone)]
pub struct Attribute {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone)]
pub struct Element {
    pub name: String,
    pub attributes: Vec<Attribute>,
    pub children: Vec<Element>,
    /// Text and CDATA content, trimmed; refused by [`Element::check_children`] unless
    /// the element's reader takes it (SafeKit's `<failover>` rules, say).
    pub text: String,
    pub text_pos: Option<Pos>,
    pub pos: Pos,
    /// The file this element came from, for error messages.
    pub file: String,
}

fn pos_at(text: &str, offset: usize) -> Pos {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    Pos {
        line: line as u32,
        column: column as u32,
    }
}

/// Parses `text` into its root element. `file` names the source in errors.
pub fn parse(file: &str, text: &str) -> Result<Element, ConfigError> {
    let error = |offset: usize, message: String| ConfigError {
        file: file.to_string(),
        pos: Some(pos_at(text, offset)),
        message,
    };
    let text_source = text;
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let start = reader.buffer_position() as usize;
        let event = reader.read_event().map_err(|e| {
            error(
                reader.error_position() as usize,
                format!("malformed XML: {e}"),
            )
        })?;
        match event {
            Event::Start(ref tag) | Event::Empty(ref tag) => {
                let name = String::from_utf8_lossy(tag.name().as_ref()).into_owned();
                if root.is_some() && stack.is_empty() {
                    return Err(error(
                        start,
                        format!("<{name}> after the root element ends"),
                    ));
                }
                let mut attributes = Vec::new();
                for attribute in tag.attributes() {
                    let attribute = attribute.map_err(|e| {
                        error(start, format!("malformed attribute in <{name}>: {e}"))
                    })?;
                    let key = String::from_utf8_lossy(attribute.key.as_ref()).into_owned();
                    let value = attribute
                        .unescape_value()
                        .map_err(|e| {
                            error(start, format!("bad value of '{key}' in <{name}>: {e}"))
                        })?
                        .into_owned();
                    attributes.push(Attribute { name: key, value });
                }
                let element = Element {
                    name,
                    attributes,
                    children: Vec::new(),
                    text: String::new(),
                    text_pos: None,
                    pos: pos_at(text, start),
                    file: file.to_string(),
                };
                if matches!(event, Event::Empty(_)) {
                    attach(&mut stack, &mut root, element);
                } else {
                    stack.push(element);
                }
            }
            Event::End(_) => {
                // quick-xml has already checked that the end tag matches.
                let element = stack.pop().expect("quick-xml reports unmatched end tags");
                attach(&mut stack, &mut root, element);
            }
            Event::Text(ref t) => {
                let text = t
                    .unescape()
                    .map_err(|e| error(start, format!("bad text: {e}")))?;
                keep_text(&mut stack, &text, pos_at(text_source, start))
                    .map_err(|message| error(start, message))?;
            }
            Event::CData(ref data) => {
                let text = String::from_utf8_lossy(data.as_ref()).into_owned();
                keep_text(&mut stack, &text, pos_at(text_source, start))
                    .map_err(|message| error(start, message))?;
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if let Some(open) = stack.last() {
        return Err(ConfigError {
            file: file.to_string(),
            pos: Some(open.pos),
            message: format!("<{}> is never closed", open.name),
        });
    }
    root.ok_or_else(|| ConfigError {
        file: file.to_string(),
        pos: None,
        message: "no root element: the file is empty".into(),
    })
}

/// Adds non-blank text to the innermost open element; text outside the root is an
/// error.
fn keep_text(stack: &mut [Element], text: &str, pos: Pos) -> Result<(), String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(());
    }
    let Some(element) = stack.last_mut() else {
        return Err(format!(
            "unexpected text '{trimmed}' outside the root element"
        ));
    };
    if !element.text.is_empty() {
        element.text.push('\n');
    }
    element.text.push_str(trimmed);
    element.text_pos.get_or_insert(pos);
    Ok(())
}

fn attach(stack: &mut [Element], root: &mut Option<Element>, element: Element) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(element),
        None => *root = Some(element),
    }
}

impl Element {
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            pos: Some(self.pos),
            message: message.into(),
        }
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.value.as_str())
    }

    pub fn required(&self, name: &str) -> Result<&str, ConfigError> {
        self.attr(name)
            .ok_or_else(|| self.error(format!("<{}> needs the attribute '{name}'", self.name)))
    }

    /// The attribute parsed as `T`, or `None` when absent.
    pub fn parsed<T: FromStr>(&self, name: &str, expected: &str) -> Result<Option<T>, ConfigError> {
        match self.attr(name) {
            None => Ok(None),
            Some(raw) => raw.trim().parse().map(Some).map_err(|_| {
                self.error(format!(
                    "attribute '{name}' of <{}> is '{raw}': expected {expected}",
                    self.name
                ))
            }),
        }
    }

    /// `on`/`off`, `true`/`false`, `yes`/`no`, as SafeKit files write them.
    pub fn flag(&self, name: &str) -> Result<Option<bool>, ConfigError> {
        match self.attr(name) {
            None => Ok(None),
            Some("on" | "true" | "yes" | "1") => Ok(Some(true)),
            Some("off" | "false" | "no" | "0") => Ok(Some(false)),
            Some(raw) => Err(self.error(format!(
                "attribute '{name}' of <{}> is '{raw}': expected on or off",
                self.name
            ))),
        }
    }

    /// Refuses attributes not in `known`; returns a warning for each in `ignored`
    /// (accepted for compatibility, with no meaning here: `(name, why)`).
    pub fn check_attributes(
        &self,
        known: &[&str],
        ignored: &[(&str, &str)],
    ) -> Result<Vec<String>, ConfigError> {
        let mut warnings = Vec::new();
        for attribute in &self.attributes {
            if known.contains(&attribute.name.as_str()) {
                continue;
            }
            if let Some((_, why)) = ignored.iter().find(|(n, _)| *n == attribute.name) {
                warnings.push(format!(
                    "{}:{}:{}: attribute '{}' of <{}> is ignored: {why}",
                    self.file, self.pos.line, self.pos.column, attribute.name, self.name
                ));
                continue;
            }
            return Err(self.error(format!(
                "unknown attribute '{}' in <{}>; known: {}",
                attribute.name,
                self.name,
                known.join(", ")
            )));
        }
        Ok(warnings)
    }

    /// Refuses child elements not in `known`, and any text.
    pub fn check_children(&self, known: &[&str]) -> Result<(), ConfigError> {
        if !self.text.is_empty() {
            return Err(ConfigError {
                file: self.file.clone(),
                pos: self.text_pos.or(Some(self.pos)),
                message: format!("unexpected text '{}' in <{}>", self.text, self.name),
            });
        }
        for child in &self.children {
            if !known.contains(&child.name.as_str()) {
                return Err(child.error(format!(
                    "unknown element <{}> in <{}>; expected {}",
                    child.name,
                    self.name,
                    if known.is_empty() {
                        "no child element".to_string()
                    } else {
                        known
                            .iter()
                            .map(|k| format!("<{k}>"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                )));
            }
        }
        Ok(())
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The only child named `name`, if any; two of them is an error.
    pub fn single_child(&self, name: &str) -> Result<Option<&Element>, ConfigError> {
        let mut found = self.children.iter().filter(|c| c.name == name);
        let first = found.next();
        if let Some(second) = found.next() {
            return Err(second.error(format!("<{name}> may appear only once in <{}>", self.name)));
        }
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_carry_their_line_and_column() {
        let root = parse("t.xml", "<a>\n  <b x=\"1\"/>\n    <c></c>\n</a>").unwrap();
        assert_eq!(root.pos, Pos { line: 1, column: 1 });
        assert_eq!(root.children[0].pos, Pos { line: 2, column: 3 });
        assert_eq!(root.children[1].pos, Pos { line: 3, column: 5 });
        assert_eq!(root.children[0].attr("x"), Some("1"));
    }

    #[test]
    fn malformed_xml_names_line_and_column() {
        let error = parse("t.xml", "<a>\n  <b>\n</a>").unwrap_err();
        assert_eq!(error.file, "t.xml");
        let pos = error.pos.expect("a position");
        assert_eq!(pos.line, 3, "{error}");
        assert!(error.message.contains("malformed XML"), "{error}");
    }

    #[test]
    fn unclosed_element_and_stray_text_are_errors() {
        let error = parse("t.xml", "<a>\n<b>").unwrap_err();
        assert!(error.to_string().starts_with("t.xml:"), "{error}");
        let root = parse("t.xml", "<a>\n  hello\n</a>").unwrap();
        let error = root.check_children(&[]).unwrap_err();
        assert!(
            error.message.contains("unexpected text 'hello' in <a>"),
            "{error}"
        );
        assert_eq!(error.pos, Some(Pos { line: 1, column: 4 }));
        let error = parse("t.xml", "<a/>\nafter").unwrap_err();
        assert!(error.message.contains("outside the root"), "{error}");
        let error = parse("t.xml", "  ").unwrap_err();
        assert!(error.message.contains("empty"), "{error}");
    }

    #[test]
    fn text_and_cdata_are_kept_for_elements_that_take_them() {
        let root = parse("t.xml", "<a><![CDATA[x < y]]>\n and &amp; more</a>").unwrap();
        assert_eq!(root.text, "x < y\nand & more");
    }

    #[test]
    fn unknown_attributes_are_errors_and_ignored_ones_warn() {
        let root = parse("t.xml", "<a known=\"1\" legacy=\"2\"/>").unwrap();
        let warnings = root
            .check_attributes(&["known"], &[("legacy", "no meaning here")])
            .unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("'legacy'"));
        let error = root.check_attributes(&["known"], &[]).unwrap_err();
        assert!(error.message.contains("unknown attribute 'legacy'"));
    }
}
