//! The `/review` page: server-rendered HTML forms, no scripts. A reviewer signs in with a
//! reviewer key (the browser keeps only a random session id, in an HttpOnly, SameSite=Strict
//! cookie that expires), sees the pending decisions with every guard's scores, and confirms or
//! overturns each with the true labels. Every form carries the session's CSRF token.

use std::fmt::Write;

use std::net::SocketAddr;

use axum::Form;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};

use super::http::record_review;
use super::review::{Item, Verdict, Which};
use super::{AppState, api::ApiError};
use crate::web::keys::Role;

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

/// The hidden field that carries the session's CSRF token (none on a server without keys).
fn csrf_field(token: Option<&str>) -> String {
    token.map(|t| format!("<input type=\"hidden\" name=\"csrf\" value=\"{}\">", escape(t))).unwrap_or_default()
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn item_html(item: &Item, csrf: &str) -> String {
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
<form method=\"post\" action=\"/review/{id}\">{csrf}<p>True labels: {boxes}</p>
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
    let principal = match state.authorize(&headers, Role::Reviewer) {
        Ok(p) => p,
        Err(e) if e.status == StatusCode::UNAUTHORIZED => return (StatusCode::UNAUTHORIZED, login_page(None)).into_response(),
        Err(e) => return e.into_response(),
    };
    let csrf = csrf_field(principal.csrf());
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
        body.push_str(&item_html(item, &csrf));
    }
    if principal.csrf().is_some() {
        body.push_str(&format!("<form method=\"post\" action=\"/review/logout\">{csrf}<button type=\"submit\" id=\"sign-out\">Sign out</button></form>"));
    }
    layout("serve-guard review", &body).into_response()
}

/// POST /review/login: a reviewer key starts a session; the browser gets its random id.
/// Failed attempts are throttled per address.
pub(crate) async fn login(State(state): State<Shared>, ConnectInfo(peer): ConnectInfo<SocketAddr>, Form(form): Form<Vec<(String, String)>>) -> Response {
    if !state.gate.has_keys() {
        return Redirect::to("/review").into_response();
    }
    match state.gate.sign_in(peer.ip(), field(&form, "key").unwrap_or_default(), &[Role::Reviewer]) {
        Ok((_, cookie)) => ([(header::SET_COOKIE, cookie)], Redirect::to("/review")).into_response(),
        Err(refusal) => {
            let message = match refusal.status {
                StatusCode::FORBIDDEN => "That is a client key; the review queue needs a reviewer key.".to_string(),
                StatusCode::UNAUTHORIZED => "Unknown key.".to_string(),
                _ => refusal.message.clone(),
            };
            (refusal.status, login_page(Some(&message))).into_response()
        }
    }
}

/// POST /review/logout: end the session.
pub(crate) async fn logout(State(state): State<Shared>, headers: HeaderMap, Form(form): Form<Vec<(String, String)>>) -> Response {
    if let Ok(principal) = state.gate.identify(&headers) {
        if let Err(refusal) = state.gate.check_form(&principal, &headers, field(&form, "csrf")) {
            return ApiError::from(refusal).into_response();
        }
    }
    ([(header::SET_COOKIE, state.gate.sign_out(&headers))], Redirect::to("/review")).into_response()
}

/// POST /review/{id}: confirm, or overturn with the ticked labels.
pub(crate) async fn decide(State(state): State<Shared>, headers: HeaderMap, Path(id): Path<i64>, Form(form): Form<Vec<(String, String)>>) -> Response {
    let principal = match state.authorize(&headers, Role::Reviewer) {
        Ok(p) => p,
        Err(e) if e.status == StatusCode::UNAUTHORIZED => return (StatusCode::UNAUTHORIZED, login_page(Some("Sign in first."))).into_response(),
        Err(e) => return e.into_response(),
    };
    if let Err(refusal) = state.gate.check_form(&principal, &headers, field(&form, "csrf")) {
        return ApiError::from(refusal).into_response();
    }
    let verdict = match field(&form, "verdict") {
        Some("confirm") => Verdict::Confirm,
        Some("overturn") => Verdict::Overturn(form.iter().filter(|(k, _)| k == "labels").map(|(_, v)| v.clone()).collect()),
        _ => return ApiError::bad_param("verdict", "expected verdict=confirm or verdict=overturn").into_response(),
    };
    match record_review(&state, id, verdict, principal.name()).await {
        Ok(_) => Redirect::to("/review").into_response(),
        Err(e) => e.into_response(),
    }
}
