//! The response future of [`RateLimit`](crate::RateLimit).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use claude_core::{BoxError, Error, ErrorKind, UsageBody, observe_usage};
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::limiter::Ticket;
use crate::queue::Acquire;

type GrantFuture = crate::grant::Grant;

pin_project! {
    #[project = StateProj]
    enum State<S, F> {
        // Refused before anything was sent.
        Rejected { error: Option<Error> },
        // Queued: `service` is the ready service `call` took (the one `poll_ready` drove),
        // called once the wait ends.
        Waiting { acquire: Acquire, service: Option<S>, request: Option<Request<Bytes>> },
        // Admitted by the key's buckets, asking the further scopes' or shared buckets.
        Granting {
            grant: GrantFuture,
            ticket: Option<Ticket>,
            service: Option<S>,
            request: Option<Request<Bytes>>,
        },
        // Admitted and sent; the ticket settles when the body ends.
        Calling { #[pin] future: F, ticket: Option<Ticket> },
        // Not a Messages call: passed through unlimited.
        Passing { #[pin] future: F },
    }
}

pin_project! {
    /// Response future of [`RateLimit`](crate::RateLimit): waits for admission if the
    /// request was queued, then drives the inner service's future.
    ///
    /// # Cancel safety
    ///
    /// Dropping it while the request waits removes the request from its queue (the next
    /// one in line is woken); nothing was charged. Dropping it after the request was sent
    /// settles the reservation as if no answer came (the server may have counted the
    /// request) and releases its concurrency slot.
    pub struct ResponseFuture<S>
    where
        S: Service<Request<Bytes>>,
    {
        #[pin]
        state: State<S, S::Future>,
    }
}

impl<S> ResponseFuture<S>
where
    S: Service<Request<Bytes>>,
{
    pub(crate) fn rejected(error: Error) -> Self {
        Self {
            state: State::Rejected { error: Some(error) },
        }
    }

    pub(crate) fn waiting(acquire: Acquire, service: S, request: Request<Bytes>) -> Self {
        Self {
            state: State::Waiting {
                acquire,
                service: Some(service),
                request: Some(request),
            },
        }
    }

    /// A locally admitted call that must also obtain a grant before `service` is called.
    pub(crate) fn granting(ticket: Ticket, mut service: S, request: Request<Bytes>) -> Self {
        match ticket.grant() {
            Some(grant) => Self {
                state: State::Granting {
                    grant,
                    ticket: Some(ticket),
                    service: Some(service),
                    request: Some(request),
                },
            },
            None => Self::calling(service.call(request), ticket),
        }
    }

    pub(crate) fn calling(future: S::Future, ticket: Ticket) -> Self {
        Self {
            state: State::Calling {
                future,
                ticket: Some(ticket),
            },
        }
    }

    pub(crate) fn passing(future: S::Future) -> Self {
        Self {
            state: State::Passing { future },
        }
    }
}

impl<S> fmt::Debug for ResponseFuture<S>
where
    S: Service<Request<Bytes>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Rejected { .. } => "rejected",
            State::Waiting { .. } => "waiting",
            State::Granting { .. } => "granting",
            State::Calling { .. } => "calling",
            State::Passing { .. } => "passing",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

fn internal(message: &'static str) -> BoxError {
    Box::new(Error::new(ErrorKind::Internal, message))
}

impl<S, B> Future for ResponseFuture<S>
where
    S: Service<Request<Bytes>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<UsageBody<B>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            match this.state.as_mut().project() {
                StateProj::Rejected { error } => {
                    return Poll::Ready(Err(error.take().map_or_else(
                        || internal("rate-limit future polled after completion"),
                        Into::into,
                    )));
                }
                StateProj::Waiting {
                    acquire,
                    service,
                    request,
                } => {
                    let ticket = match ready!(Pin::new(acquire).poll(cx)) {
                        Ok(ticket) => ticket,
                        Err(e) => {
                            this.state.set(State::Rejected { error: None });
                            return Poll::Ready(Err(e.into()));
                        }
                    };
                    let (Some(mut service), Some(request)) = (service.take(), request.take())
                    else {
                        return Poll::Ready(Err(internal("rate-limit future lost its request")));
                    };
                    if let Some(grant) = ticket.grant() {
                        this.state.set(State::Granting {
                            grant,
                            ticket: Some(ticket),
                            service: Some(service),
                            request: Some(request),
                        });
                        continue;
                    }
                    let future = service.call(request);
                    this.state.set(State::Calling {
                        future,
                        ticket: Some(ticket),
                    });
                }
                StateProj::Granting {
                    grant,
                    ticket,
                    service,
                    request,
                } => {
                    let granted = ready!(grant.as_mut().poll(cx));
                    let (Some(mut ticket), Some(mut service), Some(request)) =
                        (ticket.take(), service.take(), request.take())
                    else {
                        return Poll::Ready(Err(internal("rate-limit future lost its request")));
                    };
                    match granted {
                        Ok(hold) => {
                            ticket.attach(hold);
                            let future = service.call(request);
                            this.state.set(State::Calling {
                                future,
                                ticket: Some(ticket),
                            });
                        }
                        Err(e) => {
                            ticket.abandon();
                            this.state.set(State::Rejected { error: None });
                            return Poll::Ready(Err(e.into()));
                        }
                    }
                }
                StateProj::Calling { future, ticket } => {
                    let result = ready!(future.poll(cx));
                    let ticket = ticket.take();
                    return Poll::Ready(match result {
                        Ok(response) => Ok(settle_on_end(response, ticket)),
                        Err(e) => {
                            // Dropping the ticket settles it as "no answer".
                            drop(ticket);
                            Err(e.into())
                        }
                    });
                }
                StateProj::Passing { future } => {
                    let response = ready!(future.poll(cx)).map_err(Into::into)?;
                    return Poll::Ready(Ok(observe_usage(response).0));
                }
            }
        }
    }
}

/// Applies the response head to the key (server figures, 429 pause) and settles the
/// reservation when the body ends, fails or is dropped.
fn settle_on_end<B>(response: Response<B>, ticket: Option<Ticket>) -> Response<UsageBody<B>>
where
    B: Body<Data = Bytes>,
{
    let Some(mut ticket) = ticket else {
        return observe_usage(response).0;
    };
    ticket.observe_head(response.status(), response.headers());
    let (response, usage) = observe_usage(response);
    usage.on_complete(move |report| ticket.settle(report));
    response
}
