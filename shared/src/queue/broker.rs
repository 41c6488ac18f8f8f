//! The [`Broker`]: the connection to the Redis that carries the queues, and the factory of their handles.

use std::{marker::PhantomData, sync::Arc, time::Duration};

use redis::aio::ConnectionManager;

use super::{
    QueueError,
    handle::{Keys, QueueHandle},
    typed::Queue,
};
use crate::settings::QueueSettings;

/// A connection to the Redis that carries the queues, shared by every queue of a process.
#[derive(Clone)]
pub struct Broker {
    /// Opens the consumers' dedicated reader connections.
    pub(super) client: redis::Client,
    conn: ConnectionManager,
    settings: Arc<QueueSettings>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("prefix", &self.settings.key_prefix)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Connects to Redis; the connection reconnects by itself after a Redis restart.
    pub async fn connect(redis_url: &str, settings: QueueSettings) -> Result<Self, QueueError> {
        let client = redis::Client::open(redis_url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(3);
        let conn = client.get_connection_manager_with_config(config).await?;
        Ok(Self {
            client,
            conn,
            settings: Arc::new(settings),
        })
    }

    /// The queue settings this broker was made with.
    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    /// A shared Redis connection, for callers that keep state of their own next to the queues.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The typed queue `name` (lowercase letters, digits, `-` and `_`).
    pub fn queue<T>(&self, name: &str) -> Result<Queue<T>, QueueError> {
        Ok(Queue {
            handle: self.handle(name)?,
            _job: PhantomData,
        })
    }

    /// The queue `name` without a job type: state and dead letters only.
    pub fn handle(&self, name: &str) -> Result<QueueHandle, QueueError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            return Err(QueueError::InvalidName(name.to_owned()));
        }
        Ok(QueueHandle::new(
            name,
            Keys::new(&self.settings.key_prefix, name),
            self.clone(),
        ))
    }
}
