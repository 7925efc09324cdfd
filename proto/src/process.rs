//! Process plumbing the binaries share: how a `main` starts (logs, TLS provider, runtime, one-line
//! errors) and when a service stops.

/// The standard services every fedq server offers beside its own, on the same TLS port: gRPC
/// health (`grpc.health.v1.Health`, reporting `service` as serving) and server reflection
/// (`grpc.reflection.v1`, describing `fedq.v1`), so standard tools (grpc_health_probe, grpcurl)
/// can check and explore a node or coordinator.
pub async fn standard_services<S: tonic::server::NamedService>() -> Result<
    (
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
    ),
    String,
> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<S>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|err| format!("cannot build the reflection service: {err}"))?;
    Ok((health, reflection))
}

/// Completes on Ctrl-C or SIGTERM, so a service can stop gracefully.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Runs a binary's async `main`: structured logs to stderr (`RUST_LOG`, else `default_filter`;
/// JSON lines when `json_logs`), the ring TLS provider, a tokio runtime. A failure is printed
/// as one line, `program: error`, and the process exits with status 1.
pub fn run_main<E: std::fmt::Display>(
    program: &str,
    default_filter: &str,
    json_logs: bool,
    main: impl std::future::Future<Output = Result<(), E>>,
) -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json_logs {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    crate::tls::install_crypto_provider();
    let outcome = tokio::runtime::Runtime::new()
        .map_err(|err| format!("cannot start the async runtime: {err}"))
        .and_then(|runtime| runtime.block_on(main).map_err(|err| err.to_string()));
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{program}: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}
