//! Subscription filters: which records the broker delivers to a consumer.
//!
//! A subscription carries one of two kinds of expression, compiled once into
//! a [`Filter`] and then evaluated against every record with
//! [`Filter::matches`]. A record is described by its `tag` (possibly empty)
//! and its properties, a slice of `(name, value)` pairs **sorted by name**
//! (looked up by binary search).
//!
//! # Tag expressions
//!
//! `*`, or an empty / whitespace-only string, matches every record.
//! Otherwise the expression is `TagA || TagB || ...`: whitespace around `||`
//! is ignored, each tag is non-empty, contains no whitespace and no `|`, and
//! is at most [`MAX_TAG_CHARS`] characters; at most [`MAX_TAGS`] tags.
//! A record matches when its tag equals one of them (case-sensitive). A `*`
//! alternative (`A || *`) matches everything, so it compiles to
//! [`Filter::All`].
//!
//! # SQL expressions
//!
//! A subset of SQL-92 (as in JMS message selectors) over record properties.
//! Keywords are case-insensitive.
//!
//! ```text
//! expr      := or
//! or        := and ( OR and )*
//! and       := not ( AND not )*
//! not       := NOT not | predicate
//! predicate := '(' expr ')'
//!            | operand cmp operand            cmp: = <> != < <= > >=
//!            | operand [NOT] IN '(' literal ( ',' literal )* ')'
//!            | operand [NOT] BETWEEN operand AND operand
//!            | operand IS [NOT] NULL
//!            | TRUE | FALSE
//! operand   := identifier | literal
//! literal   := 'string' | number | TRUE | FALSE
//! ```
//!
//! - An identifier names a property: ASCII letters, digits, `_`, `.` and
//!   `-`, starting with a letter or `_` (so `a-1` is one identifier; write
//!   `a > -1` for a negative number). Any other name, including one that is
//!   a keyword, can be written double-quoted: `"my key"`, with `""` for a
//!   literal `"`.
//! - A string literal is single-quoted, with `''` for a literal `'`.
//! - A number is `-?digits(.digits)?`.
//! - `NULL` is only valid in `IS [NOT] NULL`.
//! - Comparing literals of different types (`'5' = 5`) and applying an
//!   ordering (`<`, `BETWEEN`, ...) to `TRUE`/`FALSE` are rejected when the
//!   expression is parsed.
//!
//! # Three-valued semantics
//!
//! Every condition evaluates to TRUE, FALSE or UNKNOWN, as in SQL:
//!
//! - A missing property is NULL. Any comparison, `IN` or `BETWEEN` involving
//!   NULL is UNKNOWN; `IS NULL` / `IS NOT NULL` are always TRUE or FALSE.
//! - Property values are strings. Compared with a number, the value is parsed
//!   as `f64` (surrounding whitespace ignored); a value that does not parse
//!   makes the comparison UNKNOWN. Compared with a string, comparison is
//!   lexicographic (by bytes). Property against property compares as numbers
//!   when both parse as numbers, else as strings. Compared with `TRUE` or
//!   `FALSE`, the value must be `true` or `false` (any case), else UNKNOWN.
//! - `x IN (a, b)` is `x = a OR x = b`; `x BETWEEN a AND b` is
//!   `a <= x AND x <= b`; the `NOT` forms negate those.
//! - `NOT UNKNOWN` is UNKNOWN; `FALSE AND UNKNOWN` is FALSE; `TRUE OR
//!   UNKNOWN` is TRUE; otherwise AND/OR with UNKNOWN give UNKNOWN.
//! - A record matches only when the whole expression is TRUE. So with `x`
//!   missing, neither `x > 1` nor `NOT (x > 1)` matches.
//!
//! # Limits
//!
//! Subscriptions come from untrusted clients: an SQL expression longer than
//! [`MAX_SQL_LEN`] bytes or nested deeper than [`MAX_SQL_DEPTH`] (parentheses
//! and `NOT`s together) is rejected with a [`FilterError`], so parsing and
//! evaluation never recurse deeply. Parsing never panics.
//!
//! Error positions are 0-based byte offsets into the expression where the
//! offending token starts; an unexpected end of input reports the
//! expression's length.

use std::cmp::Ordering;
use std::fmt;

/// Most alternatives in a tag expression.
pub const MAX_TAGS: usize = 64;
/// Longest tag in a tag expression, in characters.
pub const MAX_TAG_CHARS: usize = 128;
/// Longest SQL expression, in bytes.
pub const MAX_SQL_LEN: usize = 4096;
/// Longest tag expression, in bytes: [`MAX_TAGS`] tags of
/// [`MAX_TAG_CHARS`] characters (up to 4 bytes each) and their separators.
pub const MAX_TAG_EXPR_LEN: usize = MAX_TAGS * (MAX_TAG_CHARS * 4 + 4);
/// Deepest nesting of parentheses and `NOT`s in an SQL expression.
pub const MAX_SQL_DEPTH: usize = 64;

/// A compiled subscription filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Matches every record.
    All,
    /// Matches records whose tag is one of these (non-empty, distinct).
    Tags(Vec<String>),
    /// Matches records for which the SQL expression is TRUE.
    Sql(Expr),
}

/// Which language a subscription's filter expression is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind {
    /// `*` or `TagA || TagB`.
    Tag,
    /// SQL-92 style condition over properties.
    Sql,
}

/// A filter expression that failed to parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} expression error at position {position}: {message}")]
pub struct FilterError {
    /// `"tag"` or `"sql"`.
    pub kind: &'static str,
    /// 0-based byte offset of the offending token (the expression's length
    /// for an unexpected end).
    pub position: usize,
    /// What is wrong.
    pub message: String,
}

impl FilterError {
    fn tag(position: usize, message: impl Into<String>) -> Self {
        FilterError {
            kind: "tag",
            position,
            message: message.into(),
        }
    }

    fn sql(position: usize, message: impl Into<String>) -> Self {
        FilterError {
            kind: "sql",
            position,
            message: message.into(),
        }
    }
}

impl Filter {
    /// Compiles a tag expression (`*`, empty, or `TagA || TagB`).
    pub fn parse_tag(expr: &str) -> Result<Filter, FilterError> {
        // Refused before it is split: what no valid expression can reach.
        if expr.len() > MAX_TAG_EXPR_LEN {
            return Err(FilterError::tag(
                MAX_TAG_EXPR_LEN,
                format!(
                    "expression is {} bytes, longer than the {MAX_TAG_EXPR_LEN}-byte limit",
                    expr.len()
                ),
            ));
        }
        parse_tags(expr)
    }

    /// Compiles an SQL expression over record properties.
    pub fn parse_sql(expr: &str) -> Result<Filter, FilterError> {
        if expr.len() > MAX_SQL_LEN {
            return Err(FilterError::sql(
                MAX_SQL_LEN,
                format!(
                    "expression is {} bytes, longer than the {MAX_SQL_LEN}-byte limit",
                    expr.len()
                ),
            ));
        }
        Parser::parse(expr).map(Filter::Sql)
    }

    /// Compiles `expr` as the given kind of expression.
    pub fn parse(kind: FilterKind, expr: &str) -> Result<Filter, FilterError> {
        match kind {
            FilterKind::Tag => Filter::parse_tag(expr),
            FilterKind::Sql => Filter::parse_sql(expr),
        }
    }

    /// True when the record should be delivered. `properties` must be sorted
    /// by name.
    pub fn matches(&self, tag: &str, properties: &[(String, String)]) -> bool {
        match self {
            Filter::All => true,
            Filter::Tags(tags) => tags.iter().any(|t| t == tag),
            Filter::Sql(expr) => expr.evaluate(properties) == Some(true),
        }
    }

    /// True when the filter matches every record.
    pub fn is_all(&self) -> bool {
        matches!(self, Filter::All)
    }
}

// ---------------------------------------------------------------------------
// Tag expressions
// ---------------------------------------------------------------------------

fn parse_tags(expr: &str) -> Result<Filter, FilterError> {
    let trimmed = expr.trim();
    if trimmed.is_empty() || trimmed == "*" {
        return Ok(Filter::All);
    }
    let char_at = |i: usize| expr[i..].chars().next();
    let skip_ws = |mut i: usize| {
        while let Some(c) = char_at(i).filter(|c| c.is_whitespace()) {
            i += c.len_utf8();
        }
        i
    };
    let is_separator = |i: usize| expr[i..].starts_with("||");

    let mut tags: Vec<String> = Vec::new();
    let mut all = false;
    let mut count = 0;
    let mut i = 0;
    loop {
        // A tag.
        i = skip_ws(i);
        match char_at(i) {
            None => {
                return Err(FilterError::tag(
                    i,
                    "expected a tag after '||', found end of expression",
                ))
            }
            Some('|') if is_separator(i) => {
                return Err(FilterError::tag(
                    i,
                    "empty alternative: expected a tag before '||'",
                ))
            }
            Some('|') => {
                return Err(FilterError::tag(
                    i,
                    "single '|': tags are separated by '||'",
                ))
            }
            Some(_) => {}
        }
        let start = i;
        while let Some(c) = char_at(i).filter(|&c| !c.is_whitespace() && c != '|') {
            i += c.len_utf8();
        }
        let tag = &expr[start..i];
        count += 1;
        if count > MAX_TAGS {
            return Err(FilterError::tag(
                start,
                format!("more than {MAX_TAGS} tags"),
            ));
        }
        let chars = tag.chars().count();
        if chars > MAX_TAG_CHARS {
            return Err(FilterError::tag(
                start,
                format!("tag is {chars} characters, longer than {MAX_TAG_CHARS}"),
            ));
        }
        if tag == "*" {
            all = true;
        } else if !tags.iter().any(|t| t == tag) {
            tags.push(tag.to_owned());
        }

        // A separator or the end.
        let after_tag = i;
        i = skip_ws(i);
        match char_at(i) {
            None => break,
            Some('|') if is_separator(i) => i += 2,
            Some('|') => {
                return Err(FilterError::tag(
                    i,
                    "single '|': tags are separated by '||'",
                ))
            }
            Some(_) => {
                return Err(FilterError::tag(
                    after_tag,
                    format!(
                        "whitespace inside tag {tag:?}: tags contain no whitespace \
                         and are separated by '||'"
                    ),
                ))
            }
        }
    }
    Ok(if all { Filter::All } else { Filter::Tags(tags) })
}

// ---------------------------------------------------------------------------
// SQL AST and evaluation
// ---------------------------------------------------------------------------

/// A compiled SQL condition. Evaluates to TRUE, FALSE or UNKNOWN
/// (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// TRUE if any branch is TRUE, else UNKNOWN if any is UNKNOWN, else FALSE.
    Or(Vec<Expr>),
    /// FALSE if any branch is FALSE, else UNKNOWN if any is UNKNOWN, else TRUE.
    And(Vec<Expr>),
    /// Negation; UNKNOWN stays UNKNOWN.
    Not(Box<Expr>),
    /// `left op right`.
    Compare {
        /// Left-hand side.
        left: Operand,
        /// Comparison operator.
        op: CmpOp,
        /// Right-hand side.
        right: Operand,
    },
    /// `operand [NOT] IN (values...)`.
    In {
        /// The value tested.
        operand: Operand,
        /// The candidates (never empty when parsed).
        values: Vec<Literal>,
        /// `NOT IN`.
        negated: bool,
    },
    /// `operand [NOT] BETWEEN low AND high` (bounds inclusive).
    Between {
        /// The value tested.
        operand: Operand,
        /// Lower bound.
        low: Operand,
        /// Upper bound.
        high: Operand,
        /// `NOT BETWEEN`.
        negated: bool,
    },
    /// `operand IS [NOT] NULL`; never UNKNOWN.
    IsNull {
        /// The value tested.
        operand: Operand,
        /// `IS NOT NULL`.
        negated: bool,
    },
    /// A bare `TRUE` or `FALSE`.
    Bool(bool),
}

/// One side of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A record property, by name; NULL when the record lacks it.
    Property(String),
    /// A constant.
    Literal(Literal),
}

/// A constant in an SQL expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `'text'`.
    String(String),
    /// `42`, `-1.5`.
    Number(f64),
    /// `TRUE` / `FALSE`.
    Bool(bool),
}

impl Literal {
    fn type_name(&self) -> &'static str {
        match self {
            Literal::String(_) => "string",
            Literal::Number(_) => "number",
            Literal::Bool(_) => "boolean",
        }
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `=`
    Eq,
    /// `<>` or `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl CmpOp {
    fn holds(self, ordering: Ordering) -> bool {
        match self {
            CmpOp::Eq => ordering == Ordering::Equal,
            CmpOp::Ne => ordering != Ordering::Equal,
            CmpOp::Lt => ordering == Ordering::Less,
            CmpOp::Le => ordering != Ordering::Greater,
            CmpOp::Gt => ordering == Ordering::Greater,
            CmpOp::Ge => ordering != Ordering::Less,
        }
    }

    fn is_ordering(self) -> bool {
        !matches!(self, CmpOp::Eq | CmpOp::Ne)
    }
}

impl fmt::Display for CmpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        })
    }
}

impl Expr {
    /// Evaluates the condition against `properties` (sorted by name):
    /// `Some(true)` is TRUE, `Some(false)` FALSE, `None` UNKNOWN.
    pub fn evaluate(&self, properties: &[(String, String)]) -> Option<bool> {
        match self {
            Expr::Or(items) => any3(items.iter().map(|e| e.evaluate(properties))),
            Expr::And(items) => {
                any3(items.iter().map(|e| e.evaluate(properties).map(|b| !b))).map(|b| !b)
            }
            Expr::Not(inner) => inner.evaluate(properties).map(|b| !b),
            Expr::Compare { left, op, right } => {
                compare(*op, resolve(left, properties), resolve(right, properties))
            }
            Expr::In {
                operand,
                values,
                negated,
            } => {
                let value = resolve(operand, properties)?;
                any3(
                    values
                        .iter()
                        .map(|lit| compare(CmpOp::Eq, Some(value), Some(literal_value(lit)))),
                )
                .map(|b| b != *negated)
            }
            Expr::Between {
                operand,
                low,
                high,
                negated,
            } => {
                let value = resolve(operand, properties);
                let above = compare(CmpOp::Ge, value, resolve(low, properties));
                let below = compare(CmpOp::Le, value, resolve(high, properties));
                any3([above.map(|b| !b), below.map(|b| !b)]).map(|outside| outside == *negated)
            }
            Expr::IsNull { operand, negated } => {
                Some(resolve(operand, properties).is_none() != *negated)
            }
            Expr::Bool(b) => Some(*b),
        }
    }
}

/// Three-valued OR: TRUE if any is TRUE, else UNKNOWN if any is UNKNOWN.
fn any3(values: impl IntoIterator<Item = Option<bool>>) -> Option<bool> {
    let mut unknown = false;
    for value in values {
        match value {
            Some(true) => return Some(true),
            Some(false) => {}
            None => unknown = true,
        }
    }
    if unknown {
        None
    } else {
        Some(false)
    }
}

/// A resolved operand. `Prop` is a property's raw string, typed by what it
/// is compared with.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Prop(&'a str),
    Str(&'a str),
    Num(f64),
    Bool(bool),
}

fn literal_value(literal: &Literal) -> Value<'_> {
    match literal {
        Literal::String(s) => Value::Str(s),
        Literal::Number(n) => Value::Num(*n),
        Literal::Bool(b) => Value::Bool(*b),
    }
}

/// The operand's value, or `None` for NULL (a missing property).
fn resolve<'a>(operand: &'a Operand, properties: &'a [(String, String)]) -> Option<Value<'a>> {
    match operand {
        Operand::Literal(literal) => Some(literal_value(literal)),
        Operand::Property(name) => properties
            .binary_search_by(|(key, _)| key.as_str().cmp(name))
            .ok()
            .map(|i| Value::Prop(properties[i].1.as_str())),
    }
}

fn parse_number(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok().filter(|n| !n.is_nan())
}

fn parse_bool(s: &str) -> Option<bool> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("true") {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// Three-valued comparison; `None` (UNKNOWN) when either side is NULL or
/// the values cannot be compared.
fn compare(op: CmpOp, left: Option<Value<'_>>, right: Option<Value<'_>>) -> Option<bool> {
    use Value::{Bool, Num, Prop, Str};
    let equality = |equal: bool| match op {
        CmpOp::Eq => Some(equal),
        CmpOp::Ne => Some(!equal),
        _ => None,
    };
    let ordering = match (left?, right?) {
        (Num(a), Num(b)) => a.partial_cmp(&b)?,
        (Num(a), Prop(s)) => a.partial_cmp(&parse_number(s)?)?,
        (Prop(s), Num(b)) => parse_number(s)?.partial_cmp(&b)?,
        (Prop(a), Prop(b)) => match (parse_number(a), parse_number(b)) {
            (Some(x), Some(y)) => x.partial_cmp(&y)?,
            _ => a.cmp(b),
        },
        (Str(a) | Prop(a), Str(b) | Prop(b)) => a.cmp(b),
        (Bool(a), Bool(b)) => return equality(a == b),
        (Bool(a), Prop(s)) | (Prop(s), Bool(a)) => return equality(parse_bool(s)? == a),
        _ => return None,
    };
    Some(op.holds(ordering))
}

// ---------------------------------------------------------------------------
// SQL lexer
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    LParen,
    RParen,
    Comma,
    Cmp(CmpOp),
    And,
    Or,
    Not,
    In,
    Between,
    Is,
    Null,
    True,
    False,
    Eof,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(name) => format!("identifier {name:?}"),
            Tok::Str(_) => "a string literal".to_owned(),
            Tok::Num(n) => format!("number {n}"),
            Tok::LParen => "'('".to_owned(),
            Tok::RParen => "')'".to_owned(),
            Tok::Comma => "','".to_owned(),
            Tok::Cmp(op) => format!("'{op}'"),
            Tok::And => "AND".to_owned(),
            Tok::Or => "OR".to_owned(),
            Tok::Not => "NOT".to_owned(),
            Tok::In => "IN".to_owned(),
            Tok::Between => "BETWEEN".to_owned(),
            Tok::Is => "IS".to_owned(),
            Tok::Null => "NULL".to_owned(),
            Tok::True => "TRUE".to_owned(),
            Tok::False => "FALSE".to_owned(),
            Tok::Eof => "end of expression".to_owned(),
        }
    }
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// Produces tokens on demand, so errors are reported in source order.
struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    /// The next token and the byte offset where it starts.
    fn next_token(&mut self) -> Result<(usize, Tok), FilterError> {
        let bytes = self.src.as_bytes();
        while bytes.get(self.pos).is_some_and(u8::is_ascii_whitespace) {
            self.pos += 1;
        }
        let start = self.pos;
        let Some(&first) = bytes.get(start) else {
            return Ok((start, Tok::Eof));
        };
        let next = bytes.get(start + 1).copied();
        let (tok, len) = match first {
            b'(' => (Tok::LParen, 1),
            b')' => (Tok::RParen, 1),
            b',' => (Tok::Comma, 1),
            b'=' => (Tok::Cmp(CmpOp::Eq), 1),
            b'<' => match next {
                Some(b'=') => (Tok::Cmp(CmpOp::Le), 2),
                Some(b'>') => (Tok::Cmp(CmpOp::Ne), 2),
                _ => (Tok::Cmp(CmpOp::Lt), 1),
            },
            b'>' => match next {
                Some(b'=') => (Tok::Cmp(CmpOp::Ge), 2),
                _ => (Tok::Cmp(CmpOp::Gt), 1),
            },
            b'!' if next == Some(b'=') => (Tok::Cmp(CmpOp::Ne), 2),
            b'\'' => return self.quoted(b'\'').map(|s| (start, Tok::Str(s))),
            b'"' => {
                let name = self.quoted(b'"')?;
                if name.is_empty() {
                    return Err(FilterError::sql(start, "empty quoted identifier"));
                }
                return Ok((start, Tok::Ident(name)));
            }
            b'0'..=b'9' => return self.number(),
            b'-' if next.is_some_and(|b| b.is_ascii_digit()) => return self.number(),
            b'_' | b'a'..=b'z' | b'A'..=b'Z' => return Ok((start, self.word())),
            _ => {
                let c = self.src[start..].chars().next().unwrap_or('\u{FFFD}');
                return Err(FilterError::sql(
                    start,
                    format!("unexpected character {c:?}"),
                ));
            }
        };
        self.pos += len;
        Ok((start, tok))
    }

    /// A `q`-quoted string starting at `self.pos`, with `qq` for `q`.
    fn quoted(&mut self, q: u8) -> Result<String, FilterError> {
        let bytes = self.src.as_bytes();
        let start = self.pos;
        let mut out = String::new();
        let mut i = start + 1;
        loop {
            let Some(offset) = bytes[i..].iter().position(|&b| b == q) else {
                return Err(FilterError::sql(
                    start,
                    if q == b'\'' {
                        "unterminated string literal"
                    } else {
                        "unterminated quoted identifier"
                    },
                ));
            };
            let end = i + offset;
            if bytes.get(end + 1) == Some(&q) {
                // Doubled quote: keep one, continue.
                out.push_str(&self.src[i..=end]);
                i = end + 2;
            } else {
                out.push_str(&self.src[i..end]);
                self.pos = end + 1;
                return Ok(out);
            }
        }
    }

    fn number(&mut self) -> Result<(usize, Tok), FilterError> {
        let bytes = self.src.as_bytes();
        let start = self.pos;
        let digit_at = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_digit);
        let mut i = start;
        if bytes[i] == b'-' {
            i += 1;
        }
        while digit_at(i) {
            i += 1;
        }
        if bytes.get(i) == Some(&b'.') && digit_at(i + 1) {
            i += 1;
            while digit_at(i) {
                i += 1;
            }
        }
        let mut end = i;
        while bytes.get(end).is_some_and(|&b| is_ident_byte(b)) {
            end += 1;
        }
        let text = &self.src[start..end];
        if end != i {
            return Err(FilterError::sql(
                start,
                format!("invalid numeric literal {text:?}"),
            ));
        }
        let value: f64 = text
            .parse()
            .map_err(|_| FilterError::sql(start, format!("invalid numeric literal {text:?}")))?;
        if !value.is_finite() {
            return Err(FilterError::sql(
                start,
                format!("numeric literal {text:?} is out of range"),
            ));
        }
        self.pos = end;
        Ok((start, Tok::Num(value)))
    }

    /// An identifier or keyword starting at `self.pos`.
    fn word(&mut self) -> Tok {
        let bytes = self.src.as_bytes();
        let start = self.pos;
        let mut end = start;
        while bytes.get(end).is_some_and(|&b| is_ident_byte(b)) {
            end += 1;
        }
        self.pos = end;
        let word = &self.src[start..end];
        const KEYWORDS: [(&str, Tok); 9] = [
            ("AND", Tok::And),
            ("OR", Tok::Or),
            ("NOT", Tok::Not),
            ("IN", Tok::In),
            ("BETWEEN", Tok::Between),
            ("IS", Tok::Is),
            ("NULL", Tok::Null),
            ("TRUE", Tok::True),
            ("FALSE", Tok::False),
        ];
        KEYWORDS
            .iter()
            .find(|(kw, _)| kw.eq_ignore_ascii_case(word))
            .map_or_else(|| Tok::Ident(word.to_owned()), |(_, tok)| tok.clone())
    }
}

// ---------------------------------------------------------------------------
// SQL parser
// ---------------------------------------------------------------------------

/// Recursive descent with one token of lookahead. Recursion happens only
/// through `(` and `NOT`, both counted against [`MAX_SQL_DEPTH`]; `AND`/`OR`
/// chains are built iteratively into flat lists.
struct Parser<'a> {
    lexer: Lexer<'a>,
    /// The lookahead token and where it starts.
    tok: Tok,
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn parse(src: &'a str) -> Result<Expr, FilterError> {
        let mut lexer = Lexer { src, pos: 0 };
        let (pos, tok) = lexer.next_token()?;
        let mut parser = Parser {
            lexer,
            tok,
            pos,
            depth: 0,
        };
        if parser.tok == Tok::Eof {
            return Err(FilterError::sql(parser.pos, "empty expression"));
        }
        let expr = parser.parse_or("expected a condition")?;
        match parser.tok {
            Tok::Eof => Ok(expr),
            Tok::RParen => Err(FilterError::sql(parser.pos, "unmatched ')'")),
            _ => parser.unexpected("expected AND, OR or end of expression"),
        }
    }

    /// Moves to the next token, returning the current one.
    fn advance(&mut self) -> Result<Tok, FilterError> {
        let (pos, tok) = self.lexer.next_token()?;
        self.pos = pos;
        Ok(std::mem::replace(&mut self.tok, tok))
    }

    /// An error at the lookahead token: "`expected`, found <token>".
    fn unexpected<T>(&self, expected: &str) -> Result<T, FilterError> {
        Err(FilterError::sql(
            self.pos,
            format!("{expected}, found {}", self.tok.describe()),
        ))
    }

    /// Enters one level of nesting at the lookahead token.
    fn enter(&mut self) -> Result<(), FilterError> {
        self.depth += 1;
        if self.depth > MAX_SQL_DEPTH {
            return Err(FilterError::sql(
                self.pos,
                format!("expression is nested deeper than {MAX_SQL_DEPTH} levels"),
            ));
        }
        Ok(())
    }

    /// `or := and (OR and)*`; `expected` describes the first condition.
    fn parse_or(&mut self, expected: &str) -> Result<Expr, FilterError> {
        let first = self.parse_and(expected)?;
        if self.tok != Tok::Or {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.tok == Tok::Or {
            self.advance()?;
            items.push(self.parse_and("expected a condition after OR")?);
        }
        Ok(Expr::Or(items))
    }

    /// `and := not (AND not)*`.
    fn parse_and(&mut self, expected: &str) -> Result<Expr, FilterError> {
        let first = self.parse_not(expected)?;
        if self.tok != Tok::And {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.tok == Tok::And {
            self.advance()?;
            items.push(self.parse_not("expected a condition after AND")?);
        }
        Ok(Expr::And(items))
    }

    /// `not := NOT not | predicate`.
    fn parse_not(&mut self, expected: &str) -> Result<Expr, FilterError> {
        if self.tok != Tok::Not {
            return self.parse_predicate(expected);
        }
        self.enter()?;
        self.advance()?;
        let inner = self.parse_not("expected a condition after NOT")?;
        self.depth -= 1;
        Ok(Expr::Not(Box::new(inner)))
    }

    fn parse_predicate(&mut self, expected: &str) -> Result<Expr, FilterError> {
        if self.tok == Tok::LParen {
            let open = self.pos;
            self.enter()?;
            self.advance()?;
            let inner = self.parse_or("expected a condition after '('")?;
            if self.tok != Tok::RParen {
                return self
                    .unexpected(&format!("expected ')' to close the '(' at position {open}"));
            }
            self.advance()?;
            self.depth -= 1;
            return Ok(inner);
        }

        let left = self.parse_operand(expected)?;
        match self.tok {
            Tok::Cmp(op) => {
                let op_pos = self.pos;
                self.advance()?;
                let right_pos = self.pos;
                let right = self.parse_operand(&format!("expected a value after '{op}'"))?;
                check_comparable(&left, &right, right_pos, op.is_ordering().then_some(op_pos))?;
                Ok(Expr::Compare { left, op, right })
            }
            Tok::Not => {
                self.advance()?;
                match self.tok {
                    Tok::In => self.parse_in(left, true),
                    Tok::Between => self.parse_between(left, true),
                    _ => self.unexpected("expected IN or BETWEEN after NOT"),
                }
            }
            Tok::In => self.parse_in(left, false),
            Tok::Between => self.parse_between(left, false),
            Tok::Is => {
                self.advance()?;
                let negated = self.tok == Tok::Not;
                if negated {
                    self.advance()?;
                }
                if self.tok != Tok::Null {
                    return self.unexpected(if negated {
                        "expected NULL after IS NOT"
                    } else {
                        "expected NULL or NOT NULL after IS"
                    });
                }
                self.advance()?;
                Ok(Expr::IsNull {
                    operand: left,
                    negated,
                })
            }
            _ => match left {
                Operand::Literal(Literal::Bool(b)) => Ok(Expr::Bool(b)),
                _ => self.unexpected(
                    "expected a comparison operator, IN, BETWEEN or IS after the operand",
                ),
            },
        }
    }

    /// An identifier or literal; `expected` describes it for the error.
    fn parse_operand(&mut self, expected: &str) -> Result<Operand, FilterError> {
        match self.tok {
            Tok::Ident(_) | Tok::Str(_) | Tok::Num(_) | Tok::True | Tok::False => {}
            Tok::Null => {
                return Err(FilterError::sql(
                    self.pos,
                    "NULL is not a value: use IS NULL or IS NOT NULL",
                ))
            }
            _ => return self.unexpected(expected),
        }
        Ok(match self.advance()? {
            Tok::Ident(name) => Operand::Property(name),
            Tok::Str(s) => Operand::Literal(Literal::String(s)),
            Tok::Num(n) => Operand::Literal(Literal::Number(n)),
            Tok::True => Operand::Literal(Literal::Bool(true)),
            other => {
                debug_assert_eq!(other, Tok::False, "checked above");
                Operand::Literal(Literal::Bool(false))
            }
        })
    }

    /// `IN ( literal, ... )`, the lookahead being IN.
    fn parse_in(&mut self, operand: Operand, negated: bool) -> Result<Expr, FilterError> {
        self.advance()?;
        if self.tok != Tok::LParen {
            return self.unexpected("expected '(' after IN");
        }
        self.advance()?;
        if self.tok == Tok::RParen {
            return Err(FilterError::sql(
                self.pos,
                "empty IN list: expected a value after '('",
            ));
        }
        let mut values = Vec::new();
        loop {
            let value_pos = self.pos;
            let value = match self.parse_operand("expected a value in the IN list")? {
                Operand::Literal(literal) => literal,
                Operand::Property(name) => {
                    return Err(FilterError::sql(
                        value_pos,
                        format!("IN list accepts only literal values, found identifier {name:?}"),
                    ))
                }
            };
            if let Operand::Literal(left) = &operand {
                check_types(left, &value, value_pos)?;
            }
            values.push(value);
            match self.tok {
                Tok::Comma => {
                    self.advance()?;
                }
                Tok::RParen => {
                    self.advance()?;
                    break;
                }
                _ => return self.unexpected("expected ',' or ')' in the IN list"),
            }
        }
        Ok(Expr::In {
            operand,
            values,
            negated,
        })
    }

    /// `BETWEEN low AND high`, the lookahead being BETWEEN.
    fn parse_between(&mut self, operand: Operand, negated: bool) -> Result<Expr, FilterError> {
        let between_pos = self.pos;
        self.advance()?;
        let low_pos = self.pos;
        let low = self.parse_operand("expected a lower bound after BETWEEN")?;
        if self.tok != Tok::And {
            return self.unexpected("expected AND after the BETWEEN lower bound");
        }
        self.advance()?;
        let high_pos = self.pos;
        let high = self.parse_operand("expected an upper bound after AND")?;
        check_comparable(&operand, &low, low_pos, Some(between_pos))?;
        check_comparable(&operand, &high, high_pos, Some(between_pos))?;
        check_comparable(&low, &high, high_pos, Some(between_pos))?;
        Ok(Expr::Between {
            operand,
            low,
            high,
            negated,
        })
    }
}

/// Rejects literals of different types compared with each other.
fn check_types(left: &Literal, right: &Literal, right_pos: usize) -> Result<(), FilterError> {
    if left.type_name() != right.type_name() {
        return Err(FilterError::sql(
            right_pos,
            format!(
                "cannot compare a {} with a {}",
                left.type_name(),
                right.type_name()
            ),
        ));
    }
    Ok(())
}

/// Checks that `left` and `right` can be compared: literals of the same type
/// and, when `ordering_pos` is set (an ordering operator at that position),
/// no boolean literal.
fn check_comparable(
    left: &Operand,
    right: &Operand,
    right_pos: usize,
    ordering_pos: Option<usize>,
) -> Result<(), FilterError> {
    if let (Operand::Literal(l), Operand::Literal(r)) = (left, right) {
        check_types(l, r, right_pos)?;
    }
    let is_bool = |o: &Operand| matches!(o, Operand::Literal(Literal::Bool(_)));
    if let Some(pos) = ordering_pos {
        if is_bool(left) || is_bool(right) {
            return Err(FilterError::sql(
                pos,
                "TRUE and FALSE can only be compared with = or <>",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        v.sort();
        v
    }

    fn sql(expr: &str) -> Filter {
        Filter::parse_sql(expr).unwrap_or_else(|e| panic!("{expr:?} failed to parse: {e}"))
    }

    /// Whether `expr` matches a record with these properties.
    fn sql_matches(expr: &str, pairs: &[(&str, &str)]) -> bool {
        sql(expr).matches("", &props(pairs))
    }

    fn sql_error(expr: &str) -> FilterError {
        match Filter::parse_sql(expr) {
            Ok(f) => panic!("{expr:?} parsed as {f:?}"),
            Err(e) => {
                assert_eq!(e.kind, "sql");
                e
            }
        }
    }

    fn tag_error(expr: &str) -> FilterError {
        match Filter::parse_tag(expr) {
            Ok(f) => panic!("{expr:?} parsed as {f:?}"),
            Err(e) => {
                assert_eq!(e.kind, "tag");
                e
            }
        }
    }

    /// Asserts `expr` fails at `position` with a message containing `needle`.
    fn assert_sql_error(expr: &str, position: usize, needle: &str) {
        let e = sql_error(expr);
        assert_eq!(e.position, position, "{expr:?}: {e}");
        assert!(e.message.contains(needle), "{expr:?}: {e}");
    }

    fn assert_tag_error(expr: &str, position: usize, needle: &str) {
        let e = tag_error(expr);
        assert_eq!(e.position, position, "{expr:?}: {e}");
        assert!(e.message.contains(needle), "{expr:?}: {e}");
    }

    fn prop(name: &str) -> Operand {
        Operand::Property(name.to_owned())
    }

    fn num(n: f64) -> Operand {
        Operand::Literal(Literal::Number(n))
    }

    fn eq(name: &str, n: f64) -> Expr {
        Expr::Compare {
            left: prop(name),
            op: CmpOp::Eq,
            right: num(n),
        }
    }

    // --- tags ---------------------------------------------------------------

    #[test]
    fn tag_wildcards_match_everything() {
        for expr in ["", "   ", "*", " * ", "\t*\n", "A || *", "* || A"] {
            let f = Filter::parse_tag(expr).unwrap();
            assert_eq!(f, Filter::All, "{expr:?}");
            assert!(f.is_all());
            assert!(f.matches("", &[]));
            assert!(f.matches("anything", &[]));
        }
    }

    #[test]
    fn tag_single() {
        let f = Filter::parse_tag("TagA").unwrap();
        assert_eq!(f, Filter::Tags(vec!["TagA".into()]));
        assert!(!f.is_all());
        assert!(f.matches("TagA", &[]));
        assert!(!f.matches("taga", &[]), "case-sensitive");
        assert!(!f.matches("TagAB", &[]));
        assert!(!f.matches("", &[]));
    }

    #[test]
    fn tag_alternatives_and_whitespace() {
        let expected = Filter::Tags(vec!["A".into(), "B".into(), "C".into()]);
        for expr in [
            "A||B||C",
            "A || B || C",
            "  A ||B||   C  ",
            "A\t||\nB || C",
            "A || B || A || C",
        ] {
            assert_eq!(Filter::parse_tag(expr).unwrap(), expected, "{expr:?}");
        }
        let f = Filter::parse_tag("A || B").unwrap();
        assert!(f.matches("A", &[]) && f.matches("B", &[]));
        assert!(!f.matches("C", &[]) && !f.matches("", &[]));
    }

    #[test]
    fn tag_characters() {
        let f = Filter::parse_tag("order.created || é-tag || a*b").unwrap();
        assert!(f.matches("order.created", &[]));
        assert!(f.matches("é-tag", &[]));
        assert!(f.matches("a*b", &[]));
    }

    #[test]
    fn tag_errors() {
        assert_tag_error("A || || B", 5, "empty alternative");
        assert_tag_error("|| A", 0, "empty alternative");
        assert_tag_error("A ||", 4, "expected a tag after '||'");
        assert_tag_error("A || ", 5, "expected a tag after '||'");
        assert_tag_error("A | B", 2, "single '|'");
        assert_tag_error("A|B", 1, "single '|'");
        assert_tag_error("A|||B", 3, "single '|'");
        assert_tag_error("|", 0, "single '|'");
        assert_tag_error("A B", 1, "whitespace inside tag");
        assert_tag_error("A || B C", 6, "whitespace inside tag");
        assert_tag_error("A || B\tC || D", 6, "whitespace inside tag");
    }

    #[test]
    fn tag_length_limit() {
        let ok = "x".repeat(MAX_TAG_CHARS);
        assert!(Filter::parse_tag(&ok).unwrap().matches(&ok, &[]));
        // Counted in characters, not bytes.
        let wide = "é".repeat(MAX_TAG_CHARS);
        assert!(Filter::parse_tag(&wide).unwrap().matches(&wide, &[]));

        let long = format!("A || {}", "x".repeat(MAX_TAG_CHARS + 1));
        assert_tag_error(&long, 5, "longer than 128");
    }

    #[test]
    fn tag_count_limit() {
        let tags: Vec<String> = (0..MAX_TAGS + 1).map(|i| format!("t{i}")).collect();
        let ok = tags[..MAX_TAGS].join(" || ");
        match Filter::parse_tag(&ok).unwrap() {
            Filter::Tags(t) => assert_eq!(t.len(), MAX_TAGS),
            other => panic!("{other:?}"),
        }
        let too_many = tags.join(" || ");
        let last = too_many.rfind("t64").unwrap();
        assert_tag_error(&too_many, last, "more than 64 tags");
    }

    // --- SQL: structure and precedence ----------------------------------------

    #[test]
    fn sql_precedence_ast() {
        let Filter::Sql(e) = sql("a = 1 OR b = 2 AND c = 3") else {
            panic!()
        };
        assert_eq!(
            e,
            Expr::Or(vec![
                eq("a", 1.0),
                Expr::And(vec![eq("b", 2.0), eq("c", 3.0)])
            ])
        );

        let Filter::Sql(e) = sql("NOT a = 1 AND b = 2") else {
            panic!()
        };
        assert_eq!(
            e,
            Expr::And(vec![Expr::Not(Box::new(eq("a", 1.0))), eq("b", 2.0)])
        );

        let Filter::Sql(e) = sql("(a = 1 OR b = 2) AND c = 3") else {
            panic!()
        };
        assert_eq!(
            e,
            Expr::And(vec![
                Expr::Or(vec![eq("a", 1.0), eq("b", 2.0)]),
                eq("c", 3.0)
            ])
        );
    }

    #[test]
    fn sql_precedence_semantics() {
        let e = "a = 1 OR b = 1 AND c = 1";
        assert!(sql_matches(e, &[("a", "1"), ("b", "0"), ("c", "0")]));
        assert!(!sql_matches(e, &[("a", "0"), ("b", "1"), ("c", "0")]));
        assert!(sql_matches(e, &[("a", "0"), ("b", "1"), ("c", "1")]));

        let e = "(a = 1 OR b = 1) AND c = 1";
        assert!(!sql_matches(e, &[("a", "1"), ("b", "0"), ("c", "0")]));
        assert!(sql_matches(e, &[("a", "0"), ("b", "1"), ("c", "1")]));

        let e = "NOT a = 1 AND b = 1";
        assert!(sql_matches(e, &[("a", "2"), ("b", "1")]));
        assert!(!sql_matches(e, &[("a", "1"), ("b", "1")]));

        assert!(sql_matches("NOT NOT a = 1", &[("a", "1")]));
        assert!(sql_matches(
            "region = 'eu' AND amount > 100",
            &[("amount", "150"), ("region", "eu")]
        ));
    }

    #[test]
    fn sql_ignores_tag() {
        let f = sql("a = 1");
        assert!(f.matches("whatever", &props(&[("a", "1")])));
        assert!(!f.is_all());
    }

    // --- SQL: comparisons -----------------------------------------------------

    #[test]
    fn sql_numeric_comparisons() {
        let p = [("amount", "150")];
        for (expr, want) in [
            ("amount = 150", true),
            ("amount = 150.0", true),
            ("amount <> 150", false),
            ("amount != 149", true),
            ("amount < 150", false),
            ("amount < 150.5", true),
            ("amount <= 150", true),
            ("amount > 100", true),
            ("amount > 150", false),
            ("amount >= 150", true),
            ("amount > -1", true),
            ("100 < amount", true),
            ("150 >= amount", true),
            ("1 = 1", true),
            ("1 < -2", false),
        ] {
            assert_eq!(sql_matches(expr, &p), want, "{expr}");
        }
        assert!(sql_matches("x < 2", &[("x", "1.5")]));
        assert!(sql_matches("x = -3", &[("x", "-3")]));
        assert!(
            sql_matches("x = 10", &[("x", " 10 ")]),
            "whitespace is ignored"
        );
        // Numeric, not lexicographic, against a number...
        assert!(sql_matches("x < 10", &[("x", "9")]));
        // ...but lexicographic against a string.
        assert!(!sql_matches("x < '10'", &[("x", "9")]));
    }

    #[test]
    fn sql_string_comparisons() {
        let p = [("region", "eu")];
        for (expr, want) in [
            ("region = 'eu'", true),
            ("region = 'EU'", false),
            ("region <> 'us'", true),
            ("region != 'eu'", false),
            ("region < 'fr'", true),
            ("region <= 'eu'", true),
            ("region > 'ap'", true),
            ("region >= 'ez'", false),
            ("'eu' = region", true),
            ("'a' < 'b'", true),
        ] {
            assert_eq!(sql_matches(expr, &p), want, "{expr}");
        }
        assert!(sql_matches(
            "name = 'héllo wörld'",
            &[("name", "héllo wörld")]
        ));
        assert!(sql_matches("name = ''", &[("name", "")]));
    }

    #[test]
    fn sql_property_vs_property() {
        assert!(sql_matches("a > b", &[("a", "10"), ("b", "9")]), "numeric");
        assert!(sql_matches("a = b", &[("a", "1.0"), ("b", "1")]), "numeric");
        assert!(
            sql_matches("a < b", &[("a", "abc"), ("b", "abd")]),
            "string"
        );
        assert!(
            sql_matches("a < b", &[("a", "10"), ("b", "x9")]),
            "mixed: string"
        );
        assert!(!sql_matches("a = b", &[("a", "1")]), "b is NULL");
    }

    #[test]
    fn sql_booleans() {
        assert!(sql_matches("TRUE", &[]));
        assert!(!sql_matches("FALSE", &[]));
        assert!(sql_matches("NOT FALSE", &[]));
        assert!(sql_matches("(true)", &[]));
        assert!(sql_matches("TRUE = TRUE", &[]));
        assert!(sql_matches("TRUE <> FALSE", &[]));
        assert!(sql_matches("flag = TRUE", &[("flag", "true")]));
        assert!(sql_matches("flag = true", &[("flag", "TRUE")]));
        assert!(sql_matches("FALSE = flag", &[("flag", "False")]));
        assert!(sql_matches("flag <> FALSE", &[("flag", "true")]));
        assert!(!sql_matches("flag = FALSE", &[("flag", "true")]));
        // Not a boolean: UNKNOWN either way.
        assert!(!sql_matches("flag = TRUE", &[("flag", "yes")]));
        assert!(!sql_matches("NOT (flag = TRUE)", &[("flag", "yes")]));
        assert!(sql_matches("TRUE AND a = 1", &[("a", "1")]));
    }

    #[test]
    fn sql_non_numeric_property_is_unknown() {
        let p = [("amount", "lots")];
        for expr in [
            "amount > 100",
            "amount = 100",
            "amount <> 100",
            "NOT (amount > 100)",
            "NOT (amount <> 100)",
        ] {
            assert!(!sql_matches(expr, &p), "{expr}");
        }
        assert!(sql_matches("amount > 100 OR TRUE", &p));
        assert!(sql_matches("amount = 'lots'", &p));
        assert!(!sql_matches("x = 1", &[("x", "NaN")]));
    }

    // --- SQL: IN, BETWEEN, IS NULL ------------------------------------------

    #[test]
    fn sql_in() {
        let p = [("region", "eu"), ("x", "2.0")];
        for (expr, want) in [
            ("region IN ('eu', 'us')", true),
            ("region IN ('us')", false),
            ("region NOT IN ('us', 'ap')", true),
            ("region NOT IN ('eu')", false),
            ("x IN (1, 2, 3)", true),
            ("x NOT IN (1, 3)", true),
            ("x IN (-2, 5)", false),
            ("missing IN (1)", false),
            ("missing NOT IN (1)", false),
            ("region in ('eu')", true),
            ("region not In ('eu')", false),
        ] {
            assert_eq!(sql_matches(expr, &p), want, "{expr}");
        }
        // Non-numeric against numbers is UNKNOWN, so NOT IN is not TRUE...
        let p = [("x", "abc")];
        assert!(!sql_matches("x IN (1, 2)", &p));
        assert!(!sql_matches("x NOT IN (1, 2)", &p));
        // ...but a matching string still makes IN TRUE.
        assert!(sql_matches("x IN (1, 'abc')", &p));
        assert!(!sql_matches("x NOT IN (1, 'abc')", &p));
    }

    #[test]
    fn sql_between() {
        let p = [("x", "5"), ("lo", "1"), ("hi", "9"), ("region", "eu")];
        for (expr, want) in [
            ("x BETWEEN 1 AND 10", true),
            ("x BETWEEN 5 AND 5", true),
            ("x BETWEEN 6 AND 10", false),
            ("x BETWEEN 1 AND 4.99", false),
            ("x NOT BETWEEN 6 AND 10", true),
            ("x NOT BETWEEN 1 AND 10", false),
            ("x between lo and hi", true),
            ("region BETWEEN 'a' AND 'f'", true),
            ("region BETWEEN 'f' AND 'z'", false),
            ("missing BETWEEN 1 AND 2", false),
            ("missing NOT BETWEEN 1 AND 2", false),
            // The first AND belongs to BETWEEN.
            ("x BETWEEN 1 AND 10 AND region = 'eu'", true),
            ("x BETWEEN 1 AND 10 AND region = 'us'", false),
        ] {
            assert_eq!(sql_matches(expr, &p), want, "{expr}");
        }
        // SQL semantics: (NULL <= 10) AND (10 <= 3) is FALSE, not UNKNOWN.
        let p = [("x", "10")];
        assert!(!sql_matches("x BETWEEN missing AND 3", &p));
        assert!(sql_matches("x NOT BETWEEN missing AND 3", &p));
        assert!(!sql_matches("x NOT BETWEEN missing AND 30", &p));
    }

    #[test]
    fn sql_is_null() {
        let p = [("x", "1"), ("empty", "")];
        assert!(sql_matches("missing IS NULL", &p));
        assert!(!sql_matches("x IS NULL", &p));
        assert!(sql_matches("x IS NOT NULL", &p));
        assert!(!sql_matches("missing IS NOT NULL", &p));
        assert!(sql_matches("empty is not null", &p));
        assert!(sql_matches("NOT missing IS NOT NULL", &p));
        assert!(!sql_matches("1 IS NULL", &p));
    }

    #[test]
    fn sql_missing_property_three_valued() {
        let none: [(&str, &str); 0] = [];
        assert!(!sql_matches("x > 1", &none));
        assert!(!sql_matches("NOT (x > 1)", &none));
        assert!(!sql_matches("x = 'a'", &none));
        assert!(!sql_matches("x <> 'a'", &none));
        assert!(sql_matches("x > 1 OR TRUE", &none));
        assert!(!sql_matches("x > 1 OR FALSE", &none));
        assert!(!sql_matches("x > 1 AND TRUE", &none));
        // UNKNOWN AND FALSE is FALSE, so its negation is TRUE.
        assert!(sql_matches("NOT (x > 1 AND FALSE)", &none));
        let p = [("a", "1")];
        assert!(!sql_matches("NOT (x > 1 OR a = 1)", &p));
        assert!(!sql_matches("NOT (x > 1 OR a = 2)", &p));
        assert!(sql_matches("x IS NULL OR x > 1", &p));

        let Filter::Sql(e) = sql("NOT (x > 1)") else {
            panic!()
        };
        assert_eq!(e.evaluate(&[]), None);
        assert_eq!(e.evaluate(&props(&[("x", "0")])), Some(true));
    }

    // --- SQL: lexical ---------------------------------------------------------

    #[test]
    fn sql_identifiers() {
        assert!(sql_matches("\"my key\" = 'v'", &[("my key", "v")]));
        assert!(sql_matches("\"and\" = 1", &[("and", "1")]));
        assert!(sql_matches("\"a\"\"b\" = 1", &[("a\"b", "1")]));
        assert!(sql_matches(
            "app.version-tag = 'x'",
            &[("app.version-tag", "x")]
        ));
        assert!(sql_matches("_x1 = 1", &[("_x1", "1")]));
        assert!(sql_matches("a-1 = 2", &[("a-1", "2")]));
        assert!(sql_matches("a>-1", &[("a", "0")]));
        // Identifiers are case-sensitive; keywords are not.
        assert!(!sql_matches("Region = 'eu'", &[("region", "eu")]));
    }

    #[test]
    fn sql_escaped_quotes() {
        assert!(sql_matches("name = 'it''s'", &[("name", "it's")]));
        assert!(sql_matches("name = ''''", &[("name", "'")]));
        assert!(sql_matches("name = 'a''''b'", &[("name", "a''b")]));
        assert!(sql_matches("name = '\"'", &[("name", "\"")]));
    }

    #[test]
    fn sql_keywords_case_insensitive() {
        let p = [("a", "1"), ("b", "2"), ("x", "2")];
        assert!(sql_matches("a = 1 and b = 2 Or NoT c iS nUlL", &p));
        assert!(sql_matches(
            "x between 1 AnD 3 and x not in (5) AND c is null",
            &p
        ));
        assert!(sql_matches("NOT(a=1) OR(b=2)", &p));
        assert!(sql_matches("a='x'AND(b=2)", &[("a", "x"), ("b", "2")]));
        // A number must not run into a word.
        assert_sql_error("a=1AND b=2", 2, "invalid numeric literal");
    }

    #[test]
    fn sql_long_flat_chains_are_fine() {
        let expr = vec!["a = 1"; 400].join(" AND ");
        assert!(expr.len() <= MAX_SQL_LEN);
        let Filter::Sql(Expr::And(items)) = sql(&expr) else {
            panic!()
        };
        assert_eq!(items.len(), 400);
        assert!(sql_matches(&expr, &[("a", "1")]));
        let expr = vec!["a = 1"; 400].join(" OR ");
        assert!(sql_matches(&expr, &[("a", "1")]));
    }

    // --- SQL: errors ----------------------------------------------------------

    #[test]
    fn sql_errors_with_positions() {
        assert_sql_error("region = ", 9, "expected a value");
        assert_sql_error("a = 'x", 4, "unterminated string literal");
        assert_sql_error("a > 1 AND", 9, "expected a condition after AND");
        assert_sql_error("a = 1 OR", 8, "expected a condition after OR");
        assert_sql_error("NOT", 3, "expected a condition after NOT");
        assert_sql_error("a IN ()", 6, "empty IN list");
        assert_sql_error("a IN", 4, "expected '(' after IN");
        assert_sql_error("a IN 1", 5, "expected '(' after IN");
        assert_sql_error("a IN (1,)", 8, "expected a value in the IN list");
        assert_sql_error("a IN (1 2)", 8, "expected ',' or ')'");
        assert_sql_error("a IN (1", 7, "expected ',' or ')'");
        assert_sql_error("a IN (b)", 6, "only literal values");
        assert_sql_error("a BETWEEN 1", 11, "expected AND");
        assert_sql_error("a BETWEEN", 9, "expected a lower bound");
        assert_sql_error("a BETWEEN 1 AND", 15, "expected an upper bound");
        assert_sql_error("a = 1 )", 6, "unmatched ')'");
        assert_sql_error("(a = 1", 6, "expected ')'");
        assert_sql_error(
            "((a = 1) OR b = 2",
            17,
            "expected ')' to close the '(' at position 0",
        );
        assert_sql_error("()", 1, "expected a condition after '('");
        assert_sql_error("@", 0, "unexpected character '@'");
        assert_sql_error("a = 1 AND é = 2", 10, "unexpected character 'é'");
        assert_sql_error("a ! 1", 2, "unexpected character '!'");
        assert_sql_error("a = -", 4, "unexpected character '-'");
        assert_sql_error("", 0, "empty expression");
        assert_sql_error("   ", 3, "empty expression");
        assert_sql_error("a = 1 b = 2", 6, "expected AND, OR or end of expression");
        assert_sql_error("a", 1, "expected a comparison operator");
        assert_sql_error("'x'", 3, "expected a comparison operator");
        assert_sql_error("a == 1", 3, "expected a value after '='");
        assert_sql_error("a = NULL", 4, "IS NULL");
        assert_sql_error("NULL IS NULL", 0, "IS NULL");
        assert_sql_error("a IS 1", 5, "expected NULL");
        assert_sql_error("a IS NOT 1", 9, "expected NULL after IS NOT");
        assert_sql_error("a NOT LIKE 'x'", 6, "expected IN or BETWEEN after NOT");
        assert_sql_error("\"abc = 1", 0, "unterminated quoted identifier");
        assert_sql_error("\"\" = 1", 0, "empty quoted identifier");
        assert_sql_error("a = 12abc", 4, "invalid numeric literal");
        assert_sql_error("a = 1.", 4, "invalid numeric literal");
        assert_sql_error("a = 1.2.3", 4, "invalid numeric literal");
        assert_sql_error(&format!("a = 1{}", "0".repeat(400)), 4, "out of range");
        assert_sql_error("= 1", 0, "expected a condition");
    }

    #[test]
    fn sql_errors_are_reported_in_source_order() {
        // The bad operand at 4 comes before the unterminated string at 6.
        assert_sql_error("a = = 'x", 4, "expected a value");
    }

    #[test]
    fn sql_type_errors() {
        assert_sql_error("'5' = 5", 6, "cannot compare a string with a number");
        assert_sql_error("1 IN (1, 'x')", 9, "cannot compare a number with a string");
        assert_sql_error("flag < TRUE", 5, "TRUE and FALSE");
        assert_sql_error("FALSE >= flag", 6, "TRUE and FALSE");
        assert_sql_error("a BETWEEN TRUE AND FALSE", 2, "TRUE and FALSE");
        assert_sql_error(
            "a BETWEEN 1 AND 'z'",
            16,
            "cannot compare a number with a string",
        );
        // A property may be compared with any literal.
        assert!(Filter::parse_sql("a IN (1, 'x', TRUE)").is_ok());
    }

    #[test]
    fn error_display() {
        let e = sql_error("a = 'x");
        assert_eq!(
            e.to_string(),
            "sql expression error at position 4: unterminated string literal"
        );
        let e = tag_error("A | B");
        assert!(e
            .to_string()
            .starts_with("tag expression error at position 2: "));
    }

    #[test]
    fn parse_dispatches_on_kind() {
        assert_eq!(
            Filter::parse(FilterKind::Tag, "A").unwrap(),
            Filter::Tags(vec!["A".into()])
        );
        assert_eq!(Filter::parse(FilterKind::Tag, "*").unwrap(), Filter::All);
        assert_eq!(
            Filter::parse(FilterKind::Sql, "a = 1").unwrap(),
            Filter::Sql(eq("a", 1.0))
        );
        assert_eq!(Filter::parse(FilterKind::Sql, "*").unwrap_err().kind, "sql");
    }

    // --- SQL: hostile input -----------------------------------------------------

    #[test]
    fn sql_depth_limit() {
        let nested = |n: usize| format!("{}a = 1{}", "(".repeat(n), ")".repeat(n));
        assert!(sql_matches(&nested(MAX_SQL_DEPTH), &[("a", "1")]));
        assert_sql_error(
            &nested(MAX_SQL_DEPTH + 1),
            MAX_SQL_DEPTH,
            "nested deeper than 64",
        );
        // Deep, yet within the length limit: the depth guard must stop it.
        let deep = nested(2000);
        assert!(deep.len() <= MAX_SQL_LEN);
        assert_sql_error(&deep, MAX_SQL_DEPTH, "nested deeper than 64");

        let nots = |n: usize| format!("{}a = 1", "NOT ".repeat(n));
        assert!(sql_matches(&nots(MAX_SQL_DEPTH), &[("a", "1")]));
        assert_sql_error(&nots(MAX_SQL_DEPTH + 1), 4 * MAX_SQL_DEPTH, "nested deeper");
        assert_sql_error(&nots(1000), 4 * MAX_SQL_DEPTH, "nested deeper");

        // Parentheses and NOTs count together: each "NOT (" is two levels.
        let mixed = |n: usize| format!("{}a = 1{}", "NOT (".repeat(n), ")".repeat(n));
        assert!(Filter::parse_sql(&mixed(MAX_SQL_DEPTH / 2)).is_ok());
        assert_sql_error(
            &mixed(MAX_SQL_DEPTH / 2 + 1),
            5 * (MAX_SQL_DEPTH / 2),
            "nested deeper",
        );
    }

    #[test]
    fn sql_nested_ten_thousand_deep_is_an_error() {
        let deep = format!("{}a = 1{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(Filter::parse_sql(&deep).is_err());
        let nots = format!("{}a = 1", "NOT ".repeat(10_000));
        assert!(Filter::parse_sql(&nots).is_err());
        let unclosed = "(".repeat(10_000);
        assert!(Filter::parse_sql(&unclosed).is_err());
    }

    #[test]
    fn sql_length_limit() {
        let mut expr = String::from("a = 1");
        while expr.len() < 5_000 {
            expr.push_str(" OR a = 1");
        }
        let e = sql_error(&expr[..5_000]);
        assert_eq!(e.position, MAX_SQL_LEN);
        assert!(e.message.contains("5000 bytes"), "{e}");

        // Exactly at the limit is accepted.
        let prefix = "name = '";
        let exact = format!("{prefix}{}'", "x".repeat(MAX_SQL_LEN - prefix.len() - 1));
        assert_eq!(exact.len(), MAX_SQL_LEN);
        assert!(Filter::parse_sql(&exact).is_ok());
        assert!(Filter::parse_sql(&format!("{exact} ")).is_err());
    }

    /// A deterministic LCG (Knuth's MMIX constants).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Parses `expr` both ways; errors must point inside the input, and
    /// whatever parses must evaluate.
    fn exercise(expr: &str, records: &[Vec<(String, String)>]) -> bool {
        let mut parsed = false;
        for kind in [FilterKind::Tag, FilterKind::Sql] {
            match Filter::parse(kind, expr) {
                Ok(filter) => {
                    parsed |= kind == FilterKind::Sql;
                    for record in records {
                        filter.matches("a", record);
                    }
                }
                Err(e) => {
                    assert!(e.position <= expr.len(), "{expr:?}: {e}");
                    assert!(expr.is_char_boundary(e.position), "{expr:?}: {e}");
                    assert!(!e.message.is_empty());
                }
            }
        }
        parsed
    }

    #[test]
    fn fuzz_never_panics() {
        let records = [
            props(&[]),
            props(&[("a", "1"), ("b", "x"), ("c", "-2.5"), ("d", "true")]),
            props(&[("a", "abc"), ("b c", "1"), ("d", "NaN")]),
        ];
        let mut rng = Lcg(0x5eed);

        // Random bytes.
        for _ in 0..3_000 {
            let len = rng.below(40);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            exercise(&String::from_utf8_lossy(&bytes), &records);
        }

        // Random token soup, which reaches deeper into the parser.
        const VOCAB: &[&str] = &[
            "a", "b", "d", "\"b c\"", "'x'", "'it''s'", "'", "\"", "1", "-2.5", "0.5", "(", ")",
            ",", "=", "<>", "!=", "<", "<=", ">", ">=", "AND", "or", "Not", "IN", "BETWEEN", "is",
            "NULL", "TRUE", "false", "@", "|", "||", "*", "-", "é", " ",
        ];
        let mut parsed = 0;
        for _ in 0..20_000 {
            let n = 1 + rng.below(14);
            let sep = if rng.below(4) == 0 { "" } else { " " };
            let expr: Vec<&str> = (0..n).map(|_| VOCAB[rng.below(VOCAB.len())]).collect();
            if exercise(&expr.join(sep), &records) {
                parsed += 1;
            }
        }
        assert!(
            parsed > 0,
            "the fuzz loop should produce some valid expressions"
        );
    }
}
