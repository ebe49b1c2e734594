//! The browser app and the JavaScript SDK, embedded in the binary so that one file runs anywhere.
//!
//! Every file under `web/` that the app needs is compiled in with `include_bytes!`; nothing is read
//! from disk at run time. Each asset is served with its content type, a strong `ETag` (a hash of the
//! bytes, computed once) and `Cache-Control: no-cache`, so browsers revalidate and get `304` until
//! the binary changes. The pages load nothing from other origins; the `Content-Security-Policy` says
//! so, which keeps a mistake (or an injected script) from reaching out.

use std::sync::OnceLock;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use super::AppState;

/// One embedded file.
struct Asset {
    /// The URL path it is served at.
    path: &'static str,
    /// Its `Content-Type`.
    content_type: &'static str,
    /// Its bytes.
    body: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// Every embedded file. `/` is `index.html`.
static ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: HTML,
        body: include_bytes!("../../web/index.html"),
    },
    Asset {
        path: "/index.html",
        content_type: HTML,
        body: include_bytes!("../../web/index.html"),
    },
    Asset {
        path: "/app.js",
        content_type: JS,
        body: include_bytes!("../../web/app.js"),
    },
    Asset {
        path: "/ui.js",
        content_type: JS,
        body: include_bytes!("../../web/ui.js"),
    },
    Asset {
        path: "/style.css",
        content_type: CSS,
        body: include_bytes!("../../web/style.css"),
    },
    Asset {
        path: "/favicon.svg",
        content_type: SVG,
        body: include_bytes!("../../web/favicon.svg"),
    },
    Asset {
        path: "/sdk/switchboard.js",
        content_type: JS,
        body: include_bytes!("../../web/sdk/switchboard.js"),
    },
];

/// What the pages may load: only this origin (WebSocket included), camera and microphone streams.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   media-src 'self' blob:; connect-src 'self'; object-src 'none'; \
                   base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// The routes of the embedded files, to merge into the server's router.
pub fn routes() -> Router<AppState> {
    ASSETS
        .iter()
        .fold(Router::new(), |r, a| r.route(a.path, get(serve_asset)))
}

fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let digest = Sha256::digest(a.body);
                format!("\"{}\"", hex::encode(&digest[..12]))
            })
            .collect()
    })
}

async fn serve_asset(uri: Uri, headers: HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|a| a.path == uri.path()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let asset = &ASSETS[i];
    let etag = etags().get(i).map(String::as_str).unwrap_or_default();
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut out = HeaderMap::new();
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Ok(v) = HeaderValue::from_str(etag) {
        out.insert(header::ETAG, v);
    }
    if fresh {
        return (StatusCode::NOT_MODIFIED, out).into_response();
    }
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    if asset.content_type == HTML {
        out.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
    }
    (out, asset.body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_has_a_distinct_path_and_a_body() {
        for (i, a) in ASSETS.iter().enumerate() {
            assert!(!a.body.is_empty(), "{} is empty", a.path);
            assert!(
                ASSETS[..i].iter().all(|b| b.path != a.path),
                "{} twice",
                a.path
            );
        }
        assert_eq!(etags().len(), ASSETS.len());
    }

    async fn get(path: &str, if_none_match: Option<&str>) -> Response {
        let mut headers = HeaderMap::new();
        if let Some(tag) = if_none_match {
            headers.insert(
                header::IF_NONE_MATCH,
                HeaderValue::from_str(tag).expect("ascii"),
            );
        }
        serve_asset(Uri::try_from(path).expect("uri"), headers).await
    }

    fn header_of(r: &Response, name: header::HeaderName) -> &str {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[tokio::test]
    async fn assets_have_their_content_type_and_revalidate_with_etags() {
        for (path, ty) in [
            ("/", HTML),
            ("/app.js", JS),
            ("/sdk/switchboard.js", JS),
            ("/style.css", CSS),
            ("/favicon.svg", SVG),
        ] {
            let r = get(path, None).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(header_of(&r, header::CONTENT_TYPE), ty, "{path}");
            assert_eq!(header_of(&r, header::CACHE_CONTROL), "no-cache");
            let etag = header_of(&r, header::ETAG).to_owned();
            assert!(etag.starts_with('"') && etag.len() > 10, "{path}: {etag}");
            let again = get(path, Some(&format!("W/\"x\", {etag}"))).await;
            assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
            let stale = get(path, Some("\"stale\"")).await;
            assert_eq!(stale.status(), StatusCode::OK, "{path}");
        }
        let page = get("/", None).await;
        assert!(header_of(&page, header::CONTENT_SECURITY_POLICY).contains("default-src 'self'"));
        assert_eq!(get("/nope.js", None).await.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_page_loads_the_app_and_the_sdk_from_this_origin() {
        let page = std::str::from_utf8(ASSETS[0].body).expect("utf-8");
        assert!(page.contains("src=\"/app.js\""));
        let app = std::str::from_utf8(
            ASSETS
                .iter()
                .find(|a| a.path == "/app.js")
                .expect("app")
                .body,
        )
        .expect("utf-8");
        assert!(app.contains("/sdk/switchboard.js"));
        for a in ASSETS {
            // The SVG namespace is a name, not a fetch.
            let text = String::from_utf8_lossy(a.body).replace("http://www.w3.org/2000/svg", "");
            assert!(
                !text.contains("https://") && !text.contains("http://"),
                "{} names another origin",
                a.path
            );
        }
    }
}
