//! The detector sandbox: a detector is exactly one read-only query. Everything else (DDL, DML,
//! COPY, external tables, SET, several statements, table functions) is refused with the line
//! and the reason, before anything is planned. Once planned, the regular expressions it writes
//! must compile ([`regexes_compile`]).

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::Path;

use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{Spanned, Statement, TableFactor, Visit, Visitor};

use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, LogicalPlan, Operator};
use rampart_core::Problem;

/// Checks the parsed statements of a detector file and returns the single query.
pub fn single_query(
    path: &Path,
    text: &str,
    first_sql_line: usize,
    mut statements: VecDeque<DfStatement>,
) -> Result<DfStatement, Problem> {
    let Some(first) = statements.pop_front() else {
        return Err(Problem::at(
            path,
            first_sql_line,
            "the detector has no SQL query after its metadata",
        ));
    };
    if let Some(second) = statements.front() {
        let line = statement_line(second)
            .or_else(|| statement_end(&first).and_then(|end| next_token_line(text, end)))
            .unwrap_or(first_sql_line);
        return Err(Problem::at(
            path,
            line,
            "a detector file holds exactly one SELECT query; found a second statement (one detector per file)",
        ));
    }
    let line = statement_line(&first).unwrap_or(first_sql_line);
    let refuse = |what: &str| {
        Err(Problem::at(
            path,
            line,
            format!(
                "{what} is not allowed in a detector: detectors may only read `events` and reference tables with one SELECT query"
            ),
        ))
    };
    match &first {
        DfStatement::CreateExternalTable(_) => refuse("CREATE EXTERNAL TABLE (reading files)"),
        DfStatement::CopyTo(_) => refuse("COPY (writing files)"),
        DfStatement::Explain(_) => refuse("EXPLAIN"),
        DfStatement::Reset(_) => refuse("RESET"),
        DfStatement::Statement(stmt) => match stmt.as_ref() {
            Statement::Query(query) => {
                let mut finder = Forbidden;
                if let ControlFlow::Break(what) = query.visit(&mut finder) {
                    return refuse(&what);
                }
                Ok(first)
            }
            other => refuse(&describe(other)),
        },
    }
}

fn statement_line(stmt: &DfStatement) -> Option<usize> {
    match stmt {
        DfStatement::Statement(s) => {
            let line = s.span().start.line;
            (line > 0).then_some(line as usize)
        }
        _ => None,
    }
}

fn statement_end(stmt: &DfStatement) -> Option<(usize, usize)> {
    match stmt {
        DfStatement::Statement(s) => {
            let end = s.span().end;
            (end.line > 0).then_some((end.line as usize, end.column as usize))
        }
        _ => None,
    }
}

/// The line of the first token after (line, column), skipping `;`, whitespace and `--` comments.
fn next_token_line(text: &str, (line, column): (usize, usize)) -> Option<usize> {
    text.lines()
        .enumerate()
        .skip(line.saturating_sub(1))
        .find_map(|(i, l)| {
            let start = if i + 1 == line {
                column.saturating_sub(1).min(l.len())
            } else {
                0
            };
            let rest = l.get(start..).unwrap_or("");
            let code = rest.split("--").next().unwrap_or("");
            code.chars()
                .any(|c| !c.is_whitespace() && c != ';')
                .then_some(i + 1)
        })
}

fn describe(stmt: &Statement) -> String {
    let text = stmt.to_string();
    let head: Vec<&str> = text.split_whitespace().take(2).collect();
    let kind = match stmt {
        Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) | Statement::Merge(_) => "DML",
        Statement::Set(_) => "SET",
        Statement::Copy { .. } => "COPY",
        _ if matches!(
            head.first().map(|h| h.to_ascii_uppercase()).as_deref(),
            Some("CREATE" | "DROP" | "ALTER" | "TRUNCATE")
        ) =>
        {
            "DDL"
        }
        _ => "this statement",
    };
    format!("{kind} (`{}`)", head.join(" "))
}

/// Finds what a query may not contain: table functions (which could read files or generate
/// unbounded data) and `SELECT ... INTO`.
struct Forbidden;

impl Visitor for Forbidden {
    type Break = String;

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<String> {
        match factor {
            TableFactor::Table {
                name, args: Some(_), ..
            } => ControlFlow::Break(format!("the table function `{name}(...)`")),
            TableFactor::TableFunction { .. } | TableFactor::Function { .. } => {
                ControlFlow::Break("a table function".into())
            }
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_query(&mut self, query: &datafusion::sql::sqlparser::ast::Query) -> ControlFlow<String> {
        if let datafusion::sql::sqlparser::ast::SetExpr::Select(select) = query.body.as_ref()
            && select.into.is_some()
        {
            return ControlFlow::Break("SELECT ... INTO (creating a table)".into());
        }
        ControlFlow::Continue(())
    }
}

/// The regular expressions a detector writes as literals compile as the query engine will
/// compile them: Rust's `regex`, whose matching takes linear time (no backtracking) and which
/// refuses patterns whose compiled form exceeds its size limit (10 MiB). Checked at load, so a
/// pattern that cannot run is refused with its reason instead of failing on every batch.
pub fn regexes_compile(plan: &LogicalPlan) -> Result<(), String> {
    let mut refused = None;
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let Some((pattern, flags)) = literal_regex(e)
                    && let Err(why) = compile_like_the_engine(pattern, flags)
                {
                    refused = Some(why);
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    refused.map_or(Ok(()), Err)
}

fn compile_like_the_engine(pattern: &str, flags: Option<&str>) -> Result<(), String> {
    let full = match flags {
        Some(flags) if !flags.is_empty() => format!("(?{flags}){pattern}"),
        _ => pattern.to_string(),
    };
    regex::Regex::new(&full).map(|_| ()).map_err(|e| {
        let shown: String = pattern.chars().take(80).collect();
        let more = if pattern.chars().count() > 80 { "…" } else { "" };
        match e {
            regex::Error::CompiledTooBig(limit) => format!(
                "the regular expression `{shown}{more}` compiles to more than {limit} bytes; \
                 write a smaller pattern (repetition counts multiply)"
            ),
            other => format!("the regular expression `{shown}{more}` does not compile: {other}"),
        }
    })
}

/// The text of a string literal.
fn text(e: Option<&Expr>) -> Option<&str> {
    match e? {
        Expr::Literal(
            ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)),
            _,
        ) => Some(s.as_str()),
        _ => None,
    }
}

/// A regex-taking call with a literal pattern: the pattern and its literal flags, if any.
fn literal_regex(e: &Expr) -> Option<(&str, Option<&str>)> {
    match e {
        Expr::ScalarFunction(f) => {
            // regexp_like/match(s, pattern, flags), regexp_replace(s, pattern, replacement,
            // flags), regexp_count(s, pattern, start, flags), regexp_instr(s, pattern, start,
            // n, flags, ...).
            let flags_at = match f.name() {
                "regexp_like" | "regexp_match" => 2,
                "regexp_replace" | "regexp_count" => 3,
                "regexp_instr" => 4,
                _ => return None,
            };
            Some((text(f.args.get(1))?, text(f.args.get(flags_at))))
        }
        Expr::BinaryExpr(b) => match b.op {
            Operator::RegexMatch | Operator::RegexNotMatch => Some((text(Some(&b.right))?, None)),
            Operator::RegexIMatch | Operator::RegexNotIMatch => Some((text(Some(&b.right))?, Some("i"))),
            _ => None,
        },
        _ => None,
    }
}
