//! The `/review` page: server-rendered HTML forms, no scripts. A reviewer signs in with a
//! reviewer key (kept in an HttpOnly, SameSite=Strict cookie), sees the pending decisions with
//! every guard's scores, and confirms or overturns each with the true labels.

use std::fmt::Write;

use axum::Form;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};

use super::http::record_review;
use super::keys::Role;
use super::review::{Item, Verdict, Which};
use super::{AppState, api::ApiError};

pub(crate) const COOKIE: &str = "lathe_key";

type Shared = std::sync::Arc<AppState>;

/// Text made safe inside HTML elements and attribute values (minijinja's escaping).
fn escape(text: &str) -> String {
    minijinja::HtmlEscape(text).to_string()
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
.item{border:1px solid #ccc;border-radius:6px;padding:1rem;margin:1rem 0}
.text{white-space:pre-wrap;background:#f6f6f6;padding:.5rem}
.hit{color:#b00;font-weight:600} table{border-collapse:collapse} td,th{padding:2px 8px;text-align:left}
.block{color:#b00}.flag{color:#a60}.allow{color:#070}";

fn layout(title: &str, body: &str) -> Html<String> {
    Html(format!("<!doctype html><html><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>{body}</body></html>", escape(title)))
}

fn login_page(message: Option<&str>) -> Html<String> {
    let note = message.map(|m| format!("<p class=\"block\" id=\"message\">{}</p>", escape(m))).unwrap_or_default();
    layout(
        "serve-guard review: sign in",
        &format!(
            "<h1>Review queue</h1>{note}<form method=\"post\" action=\"/review/login\"><label>Reviewer key <input type=\"password\" name=\"key\" id=\"key\" autocomplete=\"off\"></label> <button type=\"submit\" id=\"sign-in\">Sign in</button></form>"
        ),
    )
}

fn item_html(item: &Item) -> String {
    let mut rows = String::new();
    for j in &item.scores {
        let class = if j.hit { " class=\"hit\"" } else { "" };
        let _ = write!(rows, "<tr{class}><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.2}</td><td>{}</td></tr>", escape(&j.guard), escape(&j.category), j.score, j.threshold, j.action.name());
    }
    let predicted = item.predicted();
    let mut boxes = String::new();
    for category in item.categories() {
        let checked = if predicted.contains(&category) { " checked" } else { "" };
        let id = format!("label-{}-{}", item.id, escape(&category));
        let _ = write!(boxes, "<label><input type=\"checkbox\" name=\"labels\" value=\"{0}\" id=\"{id}\"{checked}> {0}</label> ", escape(&category));
    }
    format!(
        "<div class=\"item\" id=\"item-{id}\"><div><b>#{id}</b> {direction} · <span class=\"{action}\">{action}</span> · {reason} · policy {policy} · request {request} · {created}</div>
<div class=\"text\">{text}</div>
<table><tr><th>guard</th><th>category</th><th>score</th><th>threshold</th><th>action</th></tr>{rows}</table>
<form method=\"post\" action=\"/review/{id}\"><p>True labels: {boxes}</p>
<button type=\"submit\" name=\"verdict\" value=\"confirm\" id=\"confirm-{id}\">Confirm the guards ({predicted})</button>
<button type=\"submit\" name=\"verdict\" value=\"overturn\" id=\"overturn-{id}\">Overturn with the labels ticked</button></form></div>",
        id = item.id,
        direction = item.direction,
        action = escape(&item.action),
        reason = escape(&item.reason),
        policy = escape(&item.policy_version),
        request = escape(&item.request_id),
        created = escape(&item.created_at),
        text = escape(&item.text),
        predicted = if predicted.is_empty() { "clean".to_string() } else { escape(&predicted.join(", ")) },
    )
}

/// GET /review: the pending decisions, or the sign-in form.
pub(crate) async fn page(State(state): State<Shared>, headers: HeaderMap) -> Response {
    match state.authorize(&headers, Role::Reviewer) {
        Ok(_) => {}
        Err(e) if e.status == StatusCode::UNAUTHORIZED => return (StatusCode::UNAUTHORIZED, login_page(None)).into_response(),
        Err(e) => return e.into_response(),
    }
    let db = state.review.clone();
    let listed = tokio::task::spawn_blocking(move || {
        let db = db.lock().unwrap_or_else(|p| p.into_inner());
        Ok::<_, crate::Error>((db.list(Which::Pending, 50)?, db.counts()?))
    })
    .await;
    let (items, counts) = match listed {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return ApiError::internal(e.one_line()).into_response(),
        Err(e) => return ApiError::internal(e.to_string()).into_response(),
    };
    let count = |k: &str| counts.get(k).copied().unwrap_or(0);
    let mut body = format!(
        "<h1>Review queue</h1><p id=\"counts\">pending <b id=\"pending\">{}</b> · confirmed <b id=\"confirmed\">{}</b> · overturned <b id=\"overturned\">{}</b></p>",
        count("pending"),
        count("confirmed"),
        count("overturned")
    );
    if items.is_empty() {
        body.push_str("<p id=\"empty\">Nothing to review.</p>");
    }
    for item in &items {
        body.push_str(&item_html(item));
    }
    layout("serve-guard review", &body).into_response()
}

/// POST /review/login: a reviewer key becomes the page's cookie.
pub(crate) async fn login(State(state): State<Shared>, Form(form): Form<Vec<(String, String)>>) -> Response {
    let key = form.iter().find(|(k, _)| k == "key").map(|(_, v)| v.trim().to_string()).unwrap_or_default();
    let Some(keys) = &state.keys else { return Redirect::to("/review").into_response() };
    match keys.check(&key) {
        Some(caller) if caller.role == Role::Reviewer => {
            let cookie = format!("{COOKIE}={key}; Path=/; HttpOnly; SameSite=Strict");
            ([(header::SET_COOKIE, cookie)], Redirect::to("/review")).into_response()
        }
        Some(_) => (StatusCode::FORBIDDEN, login_page(Some("That is a client key; the review queue needs a reviewer key."))).into_response(),
        None => (StatusCode::UNAUTHORIZED, login_page(Some("Unknown key."))).into_response(),
    }
}

/// POST /review/{id}: confirm, or overturn with the ticked labels.
pub(crate) async fn decide(State(state): State<Shared>, headers: HeaderMap, Path(id): Path<i64>, Form(form): Form<Vec<(String, String)>>) -> Response {
    let caller = match state.authorize(&headers, Role::Reviewer) {
        Ok(c) => c,
        Err(e) if e.status == StatusCode::UNAUTHORIZED => return (StatusCode::UNAUTHORIZED, login_page(Some("Sign in first."))).into_response(),
        Err(e) => return e.into_response(),
    };
    let verdict = match form.iter().find(|(k, _)| k == "verdict").map(|(_, v)| v.as_str()) {
        Some("confirm") => Verdict::Confirm,
        Some("overturn") => Verdict::Overturn(form.iter().filter(|(k, _)| k == "labels").map(|(_, v)| v.clone()).collect()),
        _ => return ApiError::bad_param("verdict", "expected verdict=confirm or verdict=overturn").into_response(),
    };
    let reviewer = caller.map_or_else(|| "anonymous".to_string(), |c| c.name);
    match record_review(&state, id, verdict, reviewer).await {
        Ok(_) => Redirect::to("/review").into_response(),
        Err(e) => e.into_response(),
    }
}
