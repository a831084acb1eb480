//! The pages, rendered on the server from minijinja templates (every value escaped by
//! minijinja), each form carrying the session's CSRF token. The one script, served from here,
//! adds the keyboard shortcuts; the forms work without it.
//!
//! `/` signs in or shows your item (or that nothing is left); `/admin` shows everyone's
//! progress, agreement and the items disagreed on most; `/guidelines` the guidelines.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Form;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use minijinja::value::Serde;
use minijinja::{Environment, context};
use serde_json::Value;

use super::answer::AnswerBody;
use super::board::{Board, Progress, unix_now};
use super::http::{item_view, refused};
use super::items::Content;
use super::report::Report;
use super::{App, ROLES, Task};
use crate::web::keys::Role;
use crate::web::{Principal, Refusal};

type Shared = Arc<App>;
type FormFields = Form<Vec<(String, String)>>;

fn environment() -> &'static Environment<'static> {
    static PAGES: OnceLock<Environment<'static>> = OnceLock::new();
    PAGES.get_or_init(|| {
        let mut env = Environment::new();
        for (name, text) in [
            ("layout.html", include_str!("pages/layout.html")),
            ("login.html", include_str!("pages/login.html")),
            ("progress.html", include_str!("pages/progress.html")),
            ("item.html", include_str!("pages/item.html")),
            ("done.html", include_str!("pages/done.html")),
            ("admin.html", include_str!("pages/admin.html")),
            ("guidelines.html", include_str!("pages/guidelines.html")),
        ] {
            env.add_template(name, text).expect("the page templates parse");
        }
        env.add_function("fmt", |value: Option<f64>| value.map_or_else(|| "-".to_string(), |v| format!("{v:.3}")));
        env
    })
}

/// A page with `status`; a template that fails to render is a 500 with one line.
fn render(name: &str, status: StatusCode, values: minijinja::Value) -> Response {
    match environment().get_template(name).and_then(|t| t.render(values)) {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", format!("page {name}: {e}")).into_response(),
    }
}

fn login_page(status: StatusCode, message: Option<&str>) -> Response {
    render("login.html", status, context! { message })
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// What a page answers a caller it refused: the sign-in page when there is no caller.
fn refused_page(r: Refusal) -> Response {
    if r.status == StatusCode::UNAUTHORIZED {
        login_page(StatusCode::UNAUTHORIZED, (r.message != Refusal::no_key().message).then_some(r.message.as_str()))
    } else {
        r.into_response()
    }
}

/// What every signed-in page shows.
fn frame(app: &App, principal: &Principal, task: Task) -> minijinja::Value {
    context! {
        annotator => principal.name(),
        csrf => principal.csrf().unwrap_or_default(),
        is_admin => App::is_admin(principal),
        guidelines => app.guidelines.is_some(),
        task => task.name(),
        task_name => task.name(),
    }
}

fn progress_view(p: &Progress) -> minijinja::Value {
    let done = p.answered + p.skipped;
    context! { answered => p.answered, skipped => p.skipped, left => p.left, done => done, total => (done + p.left).max(1) }
}

/// GET /: your item, or the sign-in page.
pub(crate) async fn home(State(app): State<Shared>, headers: HeaderMap) -> Response {
    match app.caller(&headers) {
        Ok(principal) => work(&app, principal, StatusCode::OK, None).await,
        Err(r) => refused_page(r),
    }
}

/// What the work page shows.
struct Work {
    task: Task,
    item: Option<Value>,
    progress: Progress,
    scale: Vec<i64>,
    /// The letters of a ranking's responses, `ABC…`.
    letters: String,
}

/// The page of the item `principal` should judge now, with `message` (why the last form failed).
async fn work(app: &Shared, principal: Principal, status: StatusCode, message: Option<String>) -> Response {
    let name = principal.name();
    let now = unix_now();
    let shown = app
        .on_board(move |board| -> crate::Result<Work> {
            let id = board.next(&name, now)?;
            let letters = id.and_then(|id| board.shown(id, &name)).map_or(String::new(), |s| (b'A'..).take(s.len()).map(char::from).collect());
            Ok(Work {
                task: board.task(),
                item: id.map(|id| item_view(board, id, &name)),
                progress: board.progress(&name, now),
                scale: (board.rules.scale.low..=board.rules.scale.high).collect(),
                letters,
            })
        })
        .await;
    let Work { task, item, progress, scale, letters } = match shown {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return super::http::refused(super::board::Refused::Failed(e)).into_response(),
        Err(r) => return r.into_response(),
    };
    let frame = frame(app, &principal, task);
    let progress = progress_view(&progress);
    match item {
        Some(item) => render("item.html", status, context! { item => Serde(item), progress, scale, letters, message, ..frame }),
        None => render("done.html", status, context! { progress, message, ..frame }),
    }
}

/// POST /login: a key starts a session; the browser gets its random id. Failed attempts are
/// throttled per address.
pub(crate) async fn login(State(app): State<Shared>, ConnectInfo(peer): ConnectInfo<SocketAddr>, Form(form): FormFields) -> Response {
    match app.gate.sign_in(peer.ip(), field(&form, "key").unwrap_or_default(), ROLES) {
        Ok((_, cookie)) => ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response(),
        Err(refusal) => {
            let message = if refusal.status == StatusCode::UNAUTHORIZED { "Unknown key.".to_string() } else { refusal.message.clone() };
            login_page(refusal.status, Some(&message))
        }
    }
}

/// POST /logout.
pub(crate) async fn logout(State(app): State<Shared>, headers: HeaderMap, Form(form): FormFields) -> Response {
    if let Ok(principal) = app.gate.identify(&headers) {
        if let Err(refusal) = app.gate.check_form(&principal, &headers, field(&form, "csrf")) {
            return refusal.into_response();
        }
    }
    ([(header::SET_COOKIE, app.gate.sign_out(&headers))], Redirect::to("/")).into_response()
}

/// A form's answer: the task's field (a score, the letters typed, the labels ticked), the comment.
fn answer_of(task: Task, form: &[(String, String)]) -> Result<AnswerBody, String> {
    let comment = field(form, "comment").map(str::to_string);
    Ok(match task {
        Task::Score => {
            let typed = field(form, "score").ok_or("Pick a score first.")?;
            AnswerBody { score: Some(typed.trim().parse().map_err(|_| format!("`{typed}` is not a score"))?), comment, ..Default::default() }
        }
        Task::Rank => AnswerBody { ranking: Some(field(form, "ranking").unwrap_or_default().to_string()), comment, ..Default::default() },
        Task::Label => AnswerBody { labels: Some(form.iter().filter(|(k, _)| k == "labels").map(|(_, v)| v.clone()).collect()), comment, ..Default::default() },
    })
}

/// A form post: checked (CSRF token, this site), decided, then back to `/` (or the page again
/// with what was wrong).
async fn decide_form(app: Shared, headers: HeaderMap, form: Vec<(String, String)>, id: Option<i64>, body: impl FnOnce(Task) -> Result<AnswerBody, String> + Send + 'static) -> Response {
    let principal = match app.caller(&headers) {
        Ok(p) => p,
        Err(r) => return refused_page(r),
    };
    if let Err(refusal) = app.gate.check_form(&principal, &headers, field(&form, "csrf")) {
        return refusal.into_response();
    }
    let name = principal.name();
    let now = unix_now();
    let decided = app
        .on_board(move |board| {
            let body = body(board.task()).map_err(super::board::Refused::Invalid)?;
            board.decide(&name, id, body, now)
        })
        .await;
    match decided {
        Ok(Ok(_)) => Redirect::to("/").into_response(),
        Ok(Err(r)) => {
            let refusal = refused(r);
            work(&app, principal, refusal.status, Some(refusal.message)).await
        }
        Err(r) => r.into_response(),
    }
}

/// POST /items/{id}/answer.
pub(crate) async fn answer(State(app): State<Shared>, headers: HeaderMap, Path(id): Path<i64>, Form(form): FormFields) -> Response {
    let fields = form.clone();
    decide_form(app, headers, form, Some(id), move |task| answer_of(task, &fields)).await
}

/// POST /items/{id}/skip.
pub(crate) async fn skip(State(app): State<Shared>, headers: HeaderMap, Path(id): Path<i64>, Form(form): FormFields) -> Response {
    decide_form(app, headers, form, Some(id), |_| Ok(AnswerBody { skip: true, ..Default::default() })).await
}

/// POST /undo: take back your latest decision.
pub(crate) async fn undo(State(app): State<Shared>, headers: HeaderMap, Form(form): FormFields) -> Response {
    decide_form(app, headers, form, None, |_| Ok(AnswerBody { undo: true, ..Default::default() })).await
}

/// The report of the running server's database.
pub(crate) fn current_report(board: &Board) -> crate::Result<Report> {
    let store = board.store();
    Ok(super::report::report(&board.settings, &store.items()?, &store.decisions()?))
}

/// An item as text, for the admin page.
fn item_text(board: &Board, id: i64) -> String {
    match board.item(id).map(|i| &i.content) {
        Some(Content::Score { response }) => format!("{}\n\n→ {}", response.prompt, response.response),
        Some(Content::Rank { responses }) => {
            let listed: Vec<String> = responses.iter().map(|r| format!("[sample {}] {}", r.sample, r.response)).collect();
            format!("{}\n\n{}", responses[0].prompt, listed.join("\n"))
        }
        Some(Content::Label { text, .. }) => text.clone(),
        None => String::new(),
    }
}

/// GET /admin: progress per annotator, agreement, the items disagreed on most.
pub(crate) async fn admin(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let principal = match app.caller(&headers) {
        Ok(p) => p,
        Err(r) => return refused_page(r),
    };
    if let Err(refusal) = principal.require(&[Role::Admin]) {
        return refusal.into_response();
    }
    let now = unix_now();
    let found = app
        .on_board(move |board| -> crate::Result<_> {
            let report = current_report(board)?;
            let progress: Vec<Progress> = board.annotators().iter().map(|a| board.progress(a, now)).collect();
            let disagreements: Vec<minijinja::Value> = report
                .disagreements
                .iter()
                .map(|d| {
                    let answers: Vec<(String, String)> = d.answers.iter().map(|(a, v)| (a.clone(), v.to_string())).collect();
                    context! { item => d.item, key => d.key.clone(), spread => d.spread, text => item_text(board, d.item), answers }
                })
                .collect();
            Ok((board.task(), report, progress, disagreements))
        })
        .await;
    match found {
        Ok(Ok((task, report, progress, disagreements))) => render("admin.html", StatusCode::OK, context! { report => Serde(report), progress => Serde(progress), disagreements, ..frame(&app, &principal, task) }),
        Ok(Err(e)) => refused(super::board::Refused::Failed(e)).into_response(),
        Err(r) => r.into_response(),
    }
}

/// GET /guidelines.
pub(crate) async fn guidelines(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let principal = match app.caller(&headers) {
        Ok(p) => p,
        Err(r) => return refused_page(r),
    };
    let Some(text) = app.guidelines.clone() else { return Refusal::new(StatusCode::NOT_FOUND, "not_found", "This server was started without --guidelines.").into_response() };
    let task = app.on_board(|board| board.task()).await.unwrap_or(Task::Score);
    render("guidelines.html", StatusCode::OK, context! { guidelines => text, ..frame(&app, &principal, task) })
}

fn asset(content_type: &'static str, text: &'static str) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type)), (header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"))], text).into_response()
}

/// GET /static/annotate.js: the keyboard shortcuts.
pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("pages/annotate.js"))
}

/// GET /static/annotate.css.
pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", include_str!("pages/annotate.css"))
}
