//! The billing-compatible endpoint: `POST /rest_api/v2/<Model>/` with form fields
//! `method1=objects.create&arg1={json}` (further `methodN`/`argN` pairs are applied in
//! order, each to the result of the previous one, as Django querysets chain). Answers
//! `{"call": "/rest_api/v2/<Model>/", "result": ...}` or `{"call": ..., "error": "..."}`;
//! an object is `{"pk": id, "model": "...", "fields": {...}}`, dates `%Y-%m-%d %H:%M:%S`
//! in local time.
//!
//! Models: `EventsStackCompact` (create, filter, get, all, count, first, last,
//! order_by, exists; `save` on an object is accepted and does nothing) and `EventsStack`
//! (the same without create, read-only). The whole chain is checked before anything
//! runs, so a bad step writes nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use chrono::{DateTime, Local, Utc};
use serde_json::{Map, Value, json};

use super::{ApiError, ApiState, EventInput, json_response, printable};
use crate::store::{
    COMPACT_FILTER_COLUMNS, CompactRow, Filter, FilterValue, STACK_FILTER_COLUMNS, StackEvent,
};

/// Most objects one `filter`/`all` returns.
pub const MAX_OBJECTS: i64 = 10_000;

const TEXT_COLUMNS: &[&str] = &["cmd", "nas_ip", "acct_session_id", "state"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Model {
    Compact,
    Stack,
}

impl Model {
    fn parse(name: &str) -> Option<Model> {
        match name {
            "EventsStackCompact" => Some(Model::Compact),
            "EventsStack" => Some(Model::Stack),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Model::Compact => "EventsStackCompact",
            Model::Stack => "EventsStack",
        }
    }
    fn columns(self) -> &'static [&'static str] {
        match self {
            Model::Compact => COMPACT_FILTER_COLUMNS,
            Model::Stack => STACK_FILTER_COLUMNS,
        }
    }
}

/// `/rest_api/v2/<Model>/` for the path of a request (for the `call` field).
pub fn call_of(path: &str) -> String {
    let model = path
        .trim_start_matches("/rest_api/v2/")
        .trim_end_matches('/');
    format!("/rest_api/v2/{model}/")
}

fn error(call: &str, e: ApiError) -> Response {
    json_response(e.status, &json!({ "call": call, "error": e.message }))
}

pub async fn method_not_allowed(req: Request) -> Response {
    let call = call_of(req.uri().path());
    error(
        &call,
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "method {} is not allowed: use POST with form fields",
                req.method()
            ),
        ),
    )
}

/// One step of the chain, parsed and type-checked before anything runs.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Create(EventInputChecked),
    Filter(Vec<(&'static str, FilterValue)>),
    Get(Vec<(&'static str, FilterValue)>),
    All,
    Count,
    Exists,
    First,
    Last,
    OrderBy(&'static str, bool),
    Save,
}

#[derive(Debug, Clone, PartialEq)]
struct EventInputChecked(crate::store::CompactEvent);

/// What the chain holds between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Manager,
    Query,
    Object,
    Value,
}

pub async fn handle(
    State(state): State<Arc<ApiState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let call = format!("/rest_api/v2/{model}/");
    match run(&state, &model, &headers, body).await {
        Ok(result) => json_response(StatusCode::OK, &json!({ "call": call, "result": result })),
        Err(e) => error(&call, e),
    }
}

async fn run(
    state: &ApiState,
    model: &str,
    headers: &HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Value, ApiError> {
    let Some(model) = Model::parse(model) else {
        return Err(ApiError::not_found(format!(
            "model `{}` is not served by nasd (EventsStackCompact, EventsStack)",
            printable(model)
        )));
    };
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ctype.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content type `{}` is not supported: send form fields (application/x-www-form-urlencoded, as curl -d does)",
                printable(ctype)
            ),
        ));
    }
    let body = body.map_err(super::json::body_rejection)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid form body: {e}")))?;
    let steps = parse_chain(model, &pairs)?;
    execute(state, model, steps).await
}

/// Reads `methodN`/`argN` in order of N and checks the chain.
fn parse_chain(model: Model, pairs: &[(String, String)]) -> Result<Vec<Step>, ApiError> {
    let mut methods: Vec<(u32, String)> = Vec::new();
    let mut args: std::collections::HashMap<u32, String> = std::collections::HashMap::new();
    for (k, v) in pairs {
        if let Some(n) = k.strip_prefix("method") {
            let n = step_number(k, n)?;
            if methods.iter().any(|(m, _)| *m == n) {
                return Err(ApiError::bad_request(format!("field {k} is given twice")));
            }
            methods.push((n, v.clone()));
        } else if let Some(n) = k.strip_prefix("arg") {
            let n = step_number(k, n)?;
            if args.insert(n, v.clone()).is_some() {
                return Err(ApiError::bad_request(format!("field {k} is given twice")));
            }
        } else {
            return Err(ApiError::bad_request(format!(
                "unknown form field `{}` (expected methodN and argN)",
                printable(k)
            )));
        }
    }
    if methods.is_empty() {
        return Err(ApiError::bad_request("no method1 field"));
    }
    methods.sort_by_key(|(n, _)| *n);
    for (i, (n, _)) in methods.iter().enumerate() {
        if *n as usize != i + 1 {
            return Err(ApiError::bad_request(format!(
                "method{} is missing (methods are numbered from 1 without gaps)",
                i + 1
            )));
        }
    }
    if let Some(n) = args.keys().find(|n| **n as usize > methods.len()) {
        return Err(ApiError::bad_request(format!("arg{n} has no method{n}")));
    }
    let mut kind = Kind::Manager;
    let mut steps = Vec::new();
    for (n, method) in &methods {
        let arg = args.get(n).map(String::as_str).unwrap_or("").trim();
        let arg: Value = if arg.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(arg)
                .map_err(|e| ApiError::bad_request(format!("arg{n}: invalid JSON: {e}")))?
        };
        let name = match (kind, method.strip_prefix("objects.")) {
            (Kind::Manager, Some(m)) => m,
            (Kind::Manager, None) => {
                return Err(ApiError::bad_request(format!(
                    "method{n}: `{}` must start with objects. (e.g. objects.create)",
                    printable(method)
                )));
            }
            (_, Some(_)) => {
                return Err(ApiError::bad_request(format!(
                    "method{n}: `{}` applies to the model; after method1 use the method alone (e.g. count)",
                    printable(method)
                )));
            }
            (_, None) => method.as_str(),
        };
        let (step, next) = match (kind, name) {
            (Kind::Manager, "create") => {
                if model != Model::Compact {
                    return Err(ApiError::bad_request(format!(
                        "method{n}: {} is read-only here; create events with EventsStackCompact",
                        model.name()
                    )));
                }
                let obj = object_arg(*n, arg)?;
                let input: EventInput = serde_json::from_value(Value::Object(coerce_ints(obj)))
                    .map_err(|e| ApiError::bad_request(format!("arg{n}: {e}")))?;
                let event = input
                    .validate()
                    .map_err(|e| ApiError::bad_request(format!("arg{n}: {e}")))?;
                (Step::Create(EventInputChecked(event)), Kind::Object)
            }
            (Kind::Manager | Kind::Query, "filter") => {
                (Step::Filter(conditions(model, *n, arg)?), Kind::Query)
            }
            (Kind::Manager | Kind::Query, "get") => {
                (Step::Get(conditions(model, *n, arg)?), Kind::Object)
            }
            (Kind::Manager | Kind::Query, "all") => (Step::All, Kind::Query),
            (Kind::Manager | Kind::Query, "count") => (Step::Count, Kind::Value),
            (Kind::Manager | Kind::Query, "exists") => (Step::Exists, Kind::Value),
            (Kind::Manager | Kind::Query, "first") => (Step::First, Kind::Object),
            (Kind::Manager | Kind::Query, "last") => (Step::Last, Kind::Object),
            (Kind::Manager | Kind::Query, "order_by") => {
                let field = match &arg {
                    Value::String(s) => s.clone(),
                    Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                        a[0].as_str().unwrap_or_default().to_string()
                    }
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "arg{n}: order_by takes one field name, e.g. \"-id\""
                        )));
                    }
                };
                let (desc, bare) = match field.strip_prefix('-') {
                    Some(f) => (true, f),
                    None => (false, field.as_str()),
                };
                (Step::OrderBy(column(model, *n, bare)?, desc), Kind::Query)
            }
            (Kind::Object, "save") => (Step::Save, Kind::Object),
            (_, other) => {
                return Err(ApiError::bad_request(format!(
                    "method{n}: `{}` is not supported on {} ({})",
                    printable(other),
                    match kind {
                        Kind::Manager => "the model",
                        Kind::Query => "a queryset",
                        Kind::Object => "an object",
                        Kind::Value => "a value",
                    },
                    match kind {
                        Kind::Manager =>
                            "objects.create, objects.filter, objects.get, objects.all, objects.count",
                        Kind::Query => "filter, get, all, count, exists, first, last, order_by",
                        Kind::Object => "save",
                        Kind::Value => "nothing",
                    }
                )));
            }
        };
        steps.push(step);
        kind = next;
    }
    Ok(steps)
}

fn step_number(field: &str, digits: &str) -> Result<u32, ApiError> {
    match digits.parse::<u32>() {
        Ok(n) if (1..=20).contains(&n) && !digits.starts_with('0') => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "form field `{}` is not methodN/argN with N in 1..20",
            printable(field)
        ))),
    }
}

fn object_arg(n: u32, arg: Value) -> Result<Map<String, Value>, ApiError> {
    match arg {
        Value::Object(m) => Ok(m),
        Value::Null => Ok(Map::new()),
        _ => Err(ApiError::bad_request(format!(
            "arg{n} must be a JSON object such as {{\"user_id\": 42}}"
        ))),
    }
}

/// Billing scripts often send numbers as strings ("42"); take those as numbers.
fn coerce_ints(mut obj: Map<String, Value>) -> Map<String, Value> {
    for key in ["user_id", "abonent_id", "usluga_id"] {
        if let Some(Value::String(s)) = obj.get(key)
            && let Ok(v) = s.trim().parse::<i64>()
        {
            obj.insert(key.to_string(), v.into());
        }
    }
    obj
}

fn column(model: Model, n: u32, name: &str) -> Result<&'static str, ApiError> {
    let name = if name == "pk" { "id" } else { name };
    model
        .columns()
        .iter()
        .find(|c| **c == name)
        .copied()
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "arg{n}: {} has no field `{}` that can be filtered (fields: pk, {})",
                model.name(),
                printable(name),
                model.columns().join(", ")
            ))
        })
}

/// `{"field": value, ...}` into equality conditions, with types checked.
fn conditions(
    model: Model,
    n: u32,
    arg: Value,
) -> Result<Vec<(&'static str, FilterValue)>, ApiError> {
    let obj = object_arg(n, arg)?;
    let mut out = Vec::new();
    for (k, v) in obj {
        let col = column(model, n, &k)?;
        let text = TEXT_COLUMNS.contains(&col);
        let value = match (&v, text) {
            (Value::Null, _) => FilterValue::Null,
            (Value::String(s), true) => {
                if s.chars().any(|c| c == '\0') {
                    return Err(ApiError::bad_request(format!(
                        "arg{n}: field {k} contains a NUL character"
                    )));
                }
                FilterValue::Text(s.clone())
            }
            (Value::Number(num), false) => match num.as_i64() {
                Some(i) => FilterValue::Int(i),
                None => {
                    return Err(ApiError::bad_request(format!(
                        "arg{n}: field {k} must be an integer, got {num}"
                    )));
                }
            },
            (Value::String(s), false) => match s.trim().parse::<i64>() {
                Ok(i) => FilterValue::Int(i),
                Err(_) => {
                    return Err(ApiError::bad_request(format!(
                        "arg{n}: field {k} must be an integer, got \"{}\"",
                        printable(s)
                    )));
                }
            },
            (other, true) => {
                return Err(ApiError::bad_request(format!(
                    "arg{n}: field {k} must be a string, got {other}"
                )));
            }
            (other, false) => {
                return Err(ApiError::bad_request(format!(
                    "arg{n}: field {k} must be an integer, got {other}"
                )));
            }
        };
        out.push((col, value));
    }
    Ok(out)
}

fn date(t: DateTime<Utc>) -> String {
    t.with_timezone(&Local)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

fn compact_object(row: &CompactRow) -> Value {
    let e = &row.event;
    json!({
        "pk": row.id,
        "model": "EventsStackCompact",
        "fields": {
            "cmd": e.cmd,
            "user_id": e.user_id,
            "abonent_id": e.abonent_id,
            "nas_ip": e.nas_ip,
            "usluga_id": e.usluga_id,
            "acct_session_id": e.acct_session_id,
            "created_at": date(row.created_at),
        }
    })
}

fn stack_object(e: &StackEvent) -> Value {
    json!({
        "pk": e.id,
        "model": "EventsStack",
        "fields": {
            "compact_id": e.compact_id,
            "event_date": date(e.event_date),
            "enqueued_at": date(e.enqueued_at),
            "cmd": e.cmd,
            "user_id": e.user_id,
            "abonent_id": e.abonent_id,
            "nas_id": e.nas_id,
            "usluga_id": e.usluga_id,
            "acct_session_id": e.acct_session_id,
            "params": Value::Object(e.params.clone()),
            "try_count": e.try_count,
            "state": e.state,
            "retry_at": e.retry_at.map(date),
            "last_error": e.last_error,
        }
    })
}

async fn fetch(state: &ApiState, model: Model, filter: &Filter) -> Result<Vec<Value>, ApiError> {
    Ok(match model {
        Model::Compact => state
            .store
            .compact_filter(filter)
            .await
            .map_err(ApiError::store)?
            .iter()
            .map(compact_object)
            .collect(),
        Model::Stack => state
            .store
            .stack_filter(filter)
            .await
            .map_err(ApiError::store)?
            .iter()
            .map(stack_object)
            .collect(),
    })
}

async fn execute(state: &ApiState, model: Model, steps: Vec<Step>) -> Result<Value, ApiError> {
    let mut filter = Filter {
        conds: Vec::new(),
        order_by: "id",
        descending: false,
        limit: MAX_OBJECTS,
    };
    let mut object: Option<Value> = None;
    let mut in_query = false;
    for step in steps {
        match step {
            Step::Create(EventInputChecked(event)) => {
                let created_at = Utc::now();
                let ids = state
                    .store
                    .enqueue_compact(std::slice::from_ref(&event))
                    .await
                    .map_err(ApiError::store)?;
                state.stats.api_enqueued.fetch_add(1, Ordering::Relaxed);
                // Answered from what was written: the expander may already have moved
                // the row on (PostgreSQL wakes it at once).
                object = ids.first().map(|id| {
                    compact_object(&CompactRow {
                        id: *id,
                        event,
                        created_at,
                    })
                });
            }
            Step::Filter(conds) => {
                filter.conds.extend(conds);
                in_query = true;
            }
            Step::All => in_query = true,
            Step::OrderBy(col, desc) => {
                filter.order_by = col;
                filter.descending = desc;
                in_query = true;
            }
            Step::Get(conds) => {
                filter.conds.extend(conds);
                let f = Filter {
                    limit: 2,
                    ..filter.clone()
                };
                let mut found = fetch(state, model, &f).await?;
                match found.len() {
                    0 => {
                        return Err(ApiError::not_found(format!(
                            "{} matching query does not exist",
                            model.name()
                        )));
                    }
                    1 => object = found.pop(),
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "get() returned more than one {}",
                            model.name()
                        )));
                    }
                }
                in_query = false;
            }
            Step::Count | Step::Exists => {
                let all = fetch(state, model, &filter).await?;
                return Ok(if step == Step::Count {
                    json!(all.len())
                } else {
                    json!(!all.is_empty())
                });
            }
            Step::First | Step::Last => {
                let f = Filter {
                    limit: 1,
                    descending: if step == Step::Last {
                        !filter.descending
                    } else {
                        filter.descending
                    },
                    ..filter.clone()
                };
                return Ok(fetch(state, model, &f)
                    .await?
                    .into_iter()
                    .next()
                    .unwrap_or(Value::Null));
            }
            Step::Save => {}
        }
    }
    if in_query {
        return Ok(Value::Array(fetch(state, model, &filter).await?));
    }
    Ok(object.unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn chains_are_checked_before_running() {
        let steps = parse_chain(
            Model::Compact,
            &pairs(&[
                ("method1", "objects.create"),
                (
                    "arg1",
                    r#"{"user_id": "42", "cmd": "user_redirect_cancel"}"#,
                ),
            ]),
        )
        .unwrap();
        assert!(matches!(&steps[0], Step::Create(EventInputChecked(e)) if e.user_id == 42));
        let err = |p: &[(&str, &str)]| parse_chain(Model::Compact, &pairs(p)).unwrap_err().message;
        assert!(
            err(&[
                ("method1", "objects.create"),
                ("arg1", r#"{"user_id": 1, "cmd": "x", "foo": 1}"#)
            ])
            .contains("unknown field `foo`")
        );
        assert!(
            err(&[
                ("method1", "objects.create"),
                ("arg1", r#"{"user_id": 1, "cmd": "Bad"}"#)
            ])
            .contains("cmd `Bad`")
        );
        assert!(
            err(&[("method1", "objects.create"), ("arg1", "{not json")])
                .starts_with("arg1: invalid JSON")
        );
        assert!(
            err(&[
                ("method1", "objects.create"),
                ("arg1", r#"{"user_id": 1, "cmd": "a"}"#),
                ("method2", "delete")
            ])
            .contains("`delete` is not supported on an object")
        );
        assert!(err(&[("method2", "count")]).contains("method1 is missing"));
        assert!(
            err(&[("method1", "objects.filter"), ("arg1", r#"{"login": "x"}"#)])
                .contains("no field `login`")
        );
        assert!(
            err(&[
                ("method1", "objects.filter"),
                ("arg1", r#"{"user_id": "x"}"#)
            ])
            .contains("must be an integer")
        );
        assert!(
            err(&[("method1", "objects.get"), ("method2", "objects.count")])
                .contains("after method1")
        );
        assert!(err(&[("foo", "bar")]).contains("unknown form field `foo`"));
        let e = parse_chain(
            Model::Stack,
            &pairs(&[("method1", "objects.create"), ("arg1", "{}")]),
        )
        .unwrap_err();
        assert!(e.message.contains("read-only"));
        let steps = parse_chain(
            Model::Stack,
            &pairs(&[
                ("method1", "objects.filter"),
                ("arg1", r#"{"pk": 3, "state": "ready"}"#),
                ("method2", "order_by"),
                ("arg2", "\"-id\""),
                ("method3", "count"),
            ]),
        )
        .unwrap();
        assert_eq!(
            steps[0],
            Step::Filter(vec![
                ("id", FilterValue::Int(3)),
                ("state", FilterValue::Text("ready".into()))
            ])
        );
        assert_eq!(steps[1], Step::OrderBy("id", true));
        assert_eq!(steps[2], Step::Count);
    }

    #[test]
    fn call_names_the_model() {
        assert_eq!(
            call_of("/rest_api/v2/EventsStackCompact"),
            "/rest_api/v2/EventsStackCompact/"
        );
        assert_eq!(
            call_of("/rest_api/v2/EventsStack/"),
            "/rest_api/v2/EventsStack/"
        );
    }
}
