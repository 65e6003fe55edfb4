//! The client's body timeouts, driven by tokio's paused clock against an in-process body.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use claude_core::{Error, ErrorKind};
use claude_stack::TimeoutBody;
use futures_util::stream::{Stream, unfold};
use http_body::Frame;
use http_body_util::BodyExt;
use http_body_util::StreamBody;

fn delayed_frames(
    delays_ms: &'static [u64],
) -> StreamBody<impl Stream<Item = Result<Frame<Bytes>, std::io::Error>>> {
    StreamBody::new(unfold(0usize, move |i| async move {
        let d = *delays_ms.get(i)?;
        tokio::time::sleep(Duration::from_millis(d)).await;
        Some((Ok(Frame::data(Bytes::from_static(b"x"))), i + 1))
    }))
}

#[tokio::test(start_paused = true)]
async fn slow_first_byte_times_out() {
    let body = TimeoutBody::new(
        delayed_frames(&[200]),
        Some(Duration::from_millis(100)),
        None,
    );
    let err = body.collect().await.err().unwrap();
    let err = err.downcast::<Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.message().contains("first-byte"));
}

#[tokio::test(start_paused = true)]
async fn idle_gap_times_out_but_steady_frames_do_not() {
    let ok = TimeoutBody::new(
        delayed_frames(&[50, 90, 90, 90]),
        Some(Duration::from_millis(100)),
        Some(Duration::from_millis(100)),
    );
    assert_eq!(ok.collect().await.unwrap().to_bytes().len(), 4);
    let stalled = TimeoutBody::new(
        delayed_frames(&[50, 90, 150]),
        Some(Duration::from_millis(100)),
        Some(Duration::from_millis(100)),
    );
    let err = stalled.collect().await.err().unwrap();
    let err = err.downcast::<Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.message().contains("idle"));
}
