//! What `producer quota` shows and does: the budgets' state in Redis, pauses and their end.

use redis::AsyncCommands;

use super::{PauseReason, Quota};

impl Quota {
    /// The budgets of the settings' providers, for `producer quota`: bucket levels, callers in line, cool-downs,
    /// pauses and today's spend.
    pub async fn report(&self) -> Result<Vec<BudgetState>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut iter: redis::AsyncIter<'_, String> =
            conn.scan_match(format!("{}:*", self.prefix)).await?;
        while let Some(key) = futures::StreamExt::next(&mut iter).await {
            keys.push(key?);
        }
        drop(iter);
        keys.sort();
        let mut out = Vec::new();
        for key in keys {
            // The costs of the callers in line (their count shows on the line itself) and the logs of what was sent.
            if key.ends_with(":asks") || key.ends_with(":answered") || key.ends_with(":flying") {
                continue;
            }
            let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await?;
            let value = match kind.as_str() {
                "hash" => {
                    let fields: Vec<(String, String)> = conn.hgetall(&key).await?;
                    fields
                        .into_iter()
                        .filter(|(f, _)| f.ends_with(":level"))
                        .map(|(f, v)| format!("{}={v}", f.trim_end_matches(":level")))
                        .collect::<Vec<_>>()
                        .join(" ")
                }
                "zset" => {
                    let waiting: u64 = conn.zcard(&key).await?;
                    format!("{waiting} in line")
                }
                "string" => conn.get::<_, String>(&key).await?,
                other => other.to_owned(),
            };
            let ttl_ms: i64 = conn.pttl(&key).await?;
            out.push(BudgetState {
                key: key
                    .trim_start_matches(&format!("{}:", self.prefix))
                    .replace(['{', '}'], ""),
                value,
                ttl_ms,
            });
        }
        Ok(out)
    }

    /// Whether `provider` is paused fleet-wide, for quota or for a refused key.
    pub async fn is_paused(&self, provider: &str) -> Result<bool, redis::RedisError> {
        Ok(self.pause_reason(provider).await?.is_some())
    }

    /// Why `provider` is paused fleet-wide, if it is.
    pub async fn pause_reason(
        &self,
        provider: &str,
    ) -> Result<Option<PauseReason>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let value: Option<String> = conn
            .get(format!("{}:pause", self.provider_base(provider)))
            .await?;
        Ok(value.as_deref().map(PauseReason::of))
    }

    /// Ends a provider's pause (`producer quota resume <provider>`); true if it was paused.
    pub async fn resume(&self, provider: &str) -> Result<bool, redis::RedisError> {
        let mut conn = self.conn.clone();
        let base = self.provider_base(provider);
        let removed: i64 = conn
            .del(&[format!("{base}:pause"), format!("{base}:probe")])
            .await?;
        Ok(removed > 0)
    }
}

/// One entry of `producer quota`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetState {
    /// The key below the quota prefix, without its hash tag's braces: `<provider>:<model>:<key hash>` (bucket
    /// levels), `…:line` (callers waiting in line), `…:cooldown`, `<provider>:pause`, `<provider>:probe`,
    /// `<provider>:spent:<day>`.
    pub key: String,
    /// Levels, the number in line, the cool-down's end, the pause's reason and message, or the day's spend.
    pub value: String,
    /// Time to live in ms (-1: none).
    pub ttl_ms: i64,
}
