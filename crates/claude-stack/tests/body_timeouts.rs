//! The client's body timeouts, driven by tokio's paused clock against an in-process body.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use claude_core::{Error, ErrorKind};
use claude_stack::TimeoutBody;
use futures_util::stream::{Stream, unfold};
use http_body::{Body, Frame};
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

/// The idle deadline runs from the last frame whether the first-byte timeout is longer or
/// shorter than the idle timeout (the first-byte timer is moved, or kept and re-armed).
#[tokio::test(start_paused = true)]
async fn the_idle_deadline_runs_from_the_last_frame_whatever_the_first_byte_timeout() {
    async fn outcome(frames: &'static [u64], first_byte: u64, idle: u64) -> Result<usize, String> {
        let started = tokio::time::Instant::now();
        let body = TimeoutBody::new(
            delayed_frames(frames),
            Some(Duration::from_millis(first_byte)),
            Some(Duration::from_millis(idle)),
        );
        match body.collect().await {
            Ok(b) => Ok(b.to_bytes().len()),
            Err(e) => {
                let e = e.downcast::<Error>().unwrap();
                assert_eq!(e.kind(), ErrorKind::Timeout);
                Err(format!(
                    "{} at {} ms",
                    e.message(),
                    started.elapsed().as_millis()
                ))
            }
        }
    }
    // A first-byte timeout longer than the idle one: a gap after the first frame times out
    // at that frame plus the idle timeout, not at the first-byte deadline.
    assert_eq!(
        outcome(&[50, 150], 500, 100).await,
        Err("the response body stalled longer than the idle timeout at 150 ms".into())
    );
    assert_eq!(outcome(&[50, 90, 90], 500, 100).await, Ok(3));
    // Shorter: the first-byte timer fires first and waits on from the frame.
    assert_eq!(outcome(&[90, 250], 100, 300).await, Ok(2));
    assert_eq!(
        outcome(&[90, 350], 100, 300).await,
        Err("the response body stalled longer than the idle timeout at 390 ms".into())
    );
}

/// The timer wakes the task that polls the body now, not only the one that polled it when
/// the timer was armed (a body is polled with a new waker when it moves to another task).
#[tokio::test(start_paused = true)]
async fn the_timeout_wakes_the_task_that_polls_the_body_now() {
    let body = TimeoutBody::new(
        delayed_frames(&[1000]),
        Some(Duration::from_millis(100)),
        None,
    );
    let mut body = std::pin::pin!(body);
    // Polled once with a waker that wakes nothing (a task that has since let go of it) ...
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(body.as_mut().poll_frame(&mut cx).is_pending());
    // ... then awaited here: the first-byte timer must wake this task at 100 ms, before the
    // frame at 1000 ms.
    let frame = tokio::time::timeout(Duration::from_secs(3600), body.as_mut().frame())
        .await
        .unwrap();
    let err = frame.unwrap().err().unwrap();
    let err = err.downcast::<Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.message().contains("first-byte"));
}
