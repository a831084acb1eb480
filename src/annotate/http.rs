//! The routes: the JSON API (`/api/...`, bearer keys or the session cookie) beside the pages
//! (`pages`). Every request is logged without content; every response forbids framing and
//! scripts from anywhere but this server.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::answer::AnswerBody;
use super::board::{Board, Progress, Refused, unix_now};
use super::items::Content;
use super::{App, ROLES, pages};
use crate::web::keys::Role;
use crate::web::{Principal, Refusal};

type Shared = Arc<App>;

pub(crate) fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(pages::home))
        .route("/login", post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/items/{id}/answer", post(pages::answer))
        .route("/items/{id}/skip", post(pages::skip))
        .route("/undo", post(pages::undo))
        .route("/admin", get(pages::admin))
        .route("/guidelines", get(pages::guidelines))
        .route("/static/annotate.js", get(pages::script))
        .route("/static/annotate.css", get(pages::style))
        .route("/api/next", get(next))
        .route("/api/items/{id}/answer", post(answer))
        .route("/api/progress", get(progress))
        .route("/api/report", get(report))
        .route("/health", get(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(app.max_body_bytes))
        .layer(middleware::from_fn(crate::web::refuse_cross_site))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// Log every request (never its content) and add the headers that keep pages to themselves.
async fn observe(State(app): State<Shared>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'none'; script-src 'self'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    if !app.quiet && path != "/health" && !path.starts_with("/static/") {
        crate::progress::line(format!("annotate: {method} {path} {} {:.1}ms", response.status().as_u16(), started.elapsed().as_secs_f64() * 1000.0));
    }
    response
}

async fn not_found(request: Request) -> Refusal {
    Refusal::new(StatusCode::NOT_FOUND, "not_found", format!("Unknown request URL: {} {}", request.method(), request.uri().path()))
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

impl App {
    /// An annotator or admin, by key or session.
    pub(crate) fn caller(&self, headers: &HeaderMap) -> Result<Principal, Refusal> {
        let principal = self.gate.identify(headers)?;
        principal.require(ROLES)?;
        Ok(principal)
    }

    pub(crate) fn is_admin(principal: &Principal) -> bool {
        principal.caller.as_ref().is_some_and(|c| c.role == Role::Admin)
    }

    /// Run `f` on the board, off the async threads (its writes wait for the disk).
    pub(crate) async fn on_board<T: Send + 'static>(self: &Arc<Self>, f: impl FnOnce(&mut Board) -> T + Send + 'static) -> Result<T, Refusal> {
        let app = self.clone();
        tokio::task::spawn_blocking(move || f(&mut app.board.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))
    }
}

pub(crate) fn refused(r: Refused) -> Refusal {
    match r {
        Refused::NoSuchItem(id) => Refusal::new(StatusCode::NOT_FOUND, "not_found", format!("There is no item {id}.")),
        Refused::NotYours(id) => Refusal::new(StatusCode::FORBIDDEN, "not_assigned", format!("Item {id} is not assigned to you; GET /api/next gives yours.")),
        Refused::AlreadyDecided(id) => Refusal::new(StatusCode::CONFLICT, "already_decided", format!("You have decided item {id} already; undo it to change it.")),
        Refused::NothingToUndo => Refusal::new(StatusCode::CONFLICT, "nothing_to_undo", "You have no decision to undo."),
        Refused::NotLatest { asked, latest } => Refusal::new(StatusCode::CONFLICT, "not_latest", format!("Undo takes back your latest decision, which is on item {latest}, not {asked}.")),
        Refused::Invalid(message) => Refusal::new(StatusCode::BAD_REQUEST, "invalid_answer", message),
        Refused::Failed(e) => failed(e),
    }
}

fn failed(e: crate::Error) -> Refusal {
    Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.one_line())
}

/// An item as its annotator sees it (the API's body, the page's content).
pub(crate) fn item_view(board: &Board, id: i64, annotator: &str) -> Value {
    let Some(item) = board.item(id) else { return Value::Null };
    match &item.content {
        Content::Score { response } => json!({
            "id": id, "task": "score", "prompt_id": response.prompt_id, "sample": response.sample, "prompt": response.prompt, "response": response.response,
            "scale": {"low": board.rules.scale.low, "high": board.rules.scale.high},
        }),
        Content::Rank { responses } => {
            let by_sample = |s: i32| responses.iter().find(|r| r.sample == s);
            let shown: Vec<i32> = board.shown(id, annotator).filter(|s| !s.is_empty()).map_or_else(|| responses.iter().map(|r| r.sample).collect(), <[i32]>::to_vec);
            let listed: Vec<Value> = shown
                .iter()
                .zip(b'A'..)
                .filter_map(|(&s, letter)| by_sample(s).map(|r| json!({"letter": char::from(letter).to_string(), "response": r.response})))
                .collect();
            json!({"id": id, "task": "rank", "prompt_id": responses[0].prompt_id, "prompt": responses[0].prompt, "responses": listed})
        }
        Content::Label { text, suggested } => {
            let labels: Vec<Value> = board.rules.labels.iter().map(|l| json!({"name": l, "suggested": suggested.contains(l)})).collect();
            json!({"id": id, "task": "label", "text": text, "suggested": suggested, "labels": labels})
        }
    }
}

/// GET /api/next: `200 {"item": …, "progress": …}`, or `204` when nothing is left for you.
async fn next(State(app): State<Shared>, headers: HeaderMap) -> Result<Response, Refusal> {
    let name = app.caller(&headers)?.name();
    let now = unix_now();
    let shown = app
        .on_board(move |board| -> crate::Result<Option<(Value, Progress)>> {
            let Some(id) = board.next(&name, now)? else { return Ok(None) };
            Ok(Some((item_view(board, id, &name), board.progress(&name, now))))
        })
        .await?
        .map_err(failed)?;
    Ok(match shown {
        Some((item, progress)) => axum::Json(json!({"item": item, "progress": progress})).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// POST /api/items/{id}/answer with `{"score": 5}`, `{"ranking": "CAB"}`, `{"labels": […]}`
/// (each with an optional `comment`), `{"skip": true}` or `{"undo": true}`. Answered once
/// committed.
async fn answer(State(app): State<Shared>, headers: HeaderMap, Path(id): Path<i64>, body: Body) -> Result<Response, Refusal> {
    let principal = app.caller(&headers)?;
    app.gate.check_json(&principal, &headers)?;
    let limit = app.max_body_bytes;
    let too_large = || Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", format!("The request body exceeds {limit} bytes."));
    if headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok()).is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| too_large())?;
    let body: AnswerBody = serde_json::from_slice(&bytes).map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "invalid_answer", format!("We could not parse the JSON body: {e}")))?;
    let name = principal.name();
    let now = unix_now();
    let (done, progress) = app
        .on_board(move |board| board.decide(&name, Some(id), body, now).map(|done| (done, board.progress(&name, now))))
        .await?
        .map_err(refused)?;
    Ok(axum::Json(json!({"ok": true, "item": done.item, "action": done.action, "progress": progress})).into_response())
}

/// GET /api/progress: yours; an admin's shows everyone's.
async fn progress(State(app): State<Shared>, headers: HeaderMap) -> Result<Response, Refusal> {
    let principal = app.caller(&headers)?;
    let (name, admin) = (principal.name(), App::is_admin(&principal));
    let now = unix_now();
    let body = app
        .on_board(move |board| {
            let mine = board.progress(&name, now);
            if !admin {
                return json!({"progress": mine});
            }
            let everyone: Vec<Progress> = board.annotators().iter().map(|a| board.progress(a, now)).collect();
            json!({"progress": mine, "annotators": everyone, "items": board.len(), "complete": board.complete(), "overlap": board.settings.overlap})
        })
        .await?;
    Ok(axum::Json(body).into_response())
}

/// GET /api/report (admin): `annotate stats --json` of the running server.
async fn report(State(app): State<Shared>, headers: HeaderMap) -> Result<Response, Refusal> {
    app.caller(&headers)?.require(&[Role::Admin])?;
    let report = app.on_board(|board| pages::current_report(board)).await?.map_err(failed)?;
    Ok(axum::Json(report).into_response())
}
