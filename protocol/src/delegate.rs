//! `AsyncRead` / `AsyncWrite` for an enum of two streams, each call passed to the variant
//! that is there: a connection before or after STARTTLS (`tls::MaybeTls`), and the
//! halves of a connection split with or without a lock (`halves`). Both variants must be
//! `Unpin` (a boxed stream is).

/// `delegate_read!(Type<S: [bounds]>, VariantA, VariantB)`
macro_rules! delegate_read {
    ($ty:ident<$s:ident: [$($bound:tt)+]>, $a:ident, $b:ident) => {
        impl<$s: $($bound)+> tokio::io::AsyncRead for $ty<$s> {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $ty::$a(x) => tokio::io::AsyncRead::poll_read(std::pin::Pin::new(x), cx, buf),
                    $ty::$b(x) => tokio::io::AsyncRead::poll_read(std::pin::Pin::new(x), cx, buf),
                }
            }
        }
    };
}

/// `delegate_write!(Type<S: [bounds]>, VariantA, VariantB)`
macro_rules! delegate_write {
    ($ty:ident<$s:ident: [$($bound:tt)+]>, $a:ident, $b:ident) => {
        impl<$s: $($bound)+> tokio::io::AsyncWrite for $ty<$s> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $ty::$a(x) => tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(x), cx, buf),
                    $ty::$b(x) => tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(x), cx, buf),
                }
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $ty::$a(x) => tokio::io::AsyncWrite::poll_write_vectored(std::pin::Pin::new(x), cx, bufs),
                    $ty::$b(x) => tokio::io::AsyncWrite::poll_write_vectored(std::pin::Pin::new(x), cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $ty::$a(x) => tokio::io::AsyncWrite::is_write_vectored(x),
                    $ty::$b(x) => tokio::io::AsyncWrite::is_write_vectored(x),
                }
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $ty::$a(x) => tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(x), cx),
                    $ty::$b(x) => tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(x), cx),
                }
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $ty::$a(x) => tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(x), cx),
                    $ty::$b(x) => tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(x), cx),
                }
            }
        }
    };
}
