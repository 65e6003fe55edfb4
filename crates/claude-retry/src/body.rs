//! [`ResponseBody`]: the inner body untouched, or the frames the layer already read followed
//! by the rest of the inner body.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The response body of [`Retry`](crate::Retry).
    ///
    /// Most responses pass through untouched. When the layer had to read the start of a
    /// body to decide (an error body it classified, the first event of a stream), the
    /// frames it read come first, exactly as received, then the rest of the inner body:
    /// the caller sees every byte the server sent, once. Errors are the inner body's.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
        },
        Prefixed {
            frames: VecDeque<Frame<Bytes>>,
            buffered: u64,
            // Boxed because it was polled in the response future before it moved here.
            rest: Option<Pin<Box<B>>>,
        },
    }
}

impl<B> ResponseBody<B> {
    /// The inner body, untouched.
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// Frames already read, then `rest` (`None` when the inner body had ended).
    pub(crate) fn prefixed(frames: VecDeque<Frame<Bytes>>, rest: Option<Pin<Box<B>>>) -> Self {
        let buffered = frames
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| d.len() as u64)
            .sum();
        Self {
            kind: Kind::Prefixed {
                frames,
                buffered,
                rest,
            },
        }
    }

    /// Whether the layer read the start of this body (an error body it classified, or the
    /// first event of a stream it peeked).
    pub fn is_prefixed(&self) -> bool {
        matches!(self.kind, Kind::Prefixed { .. })
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Inner { .. } => f.write_str("ResponseBody::Inner"),
            Kind::Prefixed {
                frames,
                buffered,
                rest,
            } => f
                .debug_struct("ResponseBody::Prefixed")
                .field("frames", &frames.len())
                .field("buffered", buffered)
                .field("rest", &rest.is_some())
                .finish(),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Prefixed {
                frames,
                buffered,
                rest,
            } => {
                if let Some(frame) = frames.pop_front() {
                    if let Some(d) = frame.data_ref() {
                        *buffered -= d.len() as u64;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                let Some(body) = rest.as_mut() else {
                    return Poll::Ready(None);
                };
                let res = ready!(body.as_mut().poll_frame(cx));
                if res.is_none() {
                    *rest = None;
                }
                Poll::Ready(res)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Prefixed { frames, rest, .. } => {
                frames.is_empty() && rest.as_ref().is_none_or(Body::is_end_stream)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Prefixed { buffered, rest, .. } => {
                let rest = rest
                    .as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(*buffered));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(*buffered));
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn prefixed_replays_frames_then_the_rest() {
        let frames: VecDeque<_> = [Frame::data(Bytes::from_static(b"ab"))].into();
        let rest = Box::pin(Full::new(Bytes::from_static(b"cde")));
        let body = ResponseBody::prefixed(frames, Some(rest));
        assert!(body.is_prefixed());
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"abcde");
    }

    #[tokio::test]
    async fn prefixed_without_rest_ends_after_its_frames() {
        let frames: VecDeque<_> = [
            Frame::data(Bytes::from_static(b"x")),
            Frame::data(Bytes::from_static(b"yz")),
        ]
        .into();
        let mut body = ResponseBody::<Full<Bytes>>::prefixed(frames, None);
        assert_eq!(body.size_hint().exact(), Some(3));
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "x");
        assert_eq!(body.size_hint().exact(), Some(2));
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "yz");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn inner_is_untouched() {
        let body = ResponseBody::inner(Full::new(Bytes::from_static(b"hello")));
        assert!(!body.is_prefixed());
        assert_eq!(body.size_hint().exact(), Some(5));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello");
    }
}
