//! The Lua scripts behind the queue's multi-step operations; each runs atomically in Redis.
//! `redis::Script` sends them by SHA and reloads them after a Redis restart.

use std::sync::LazyLock;

use redis::Script;

macro_rules! script {
    ($name:ident, $file:literal) => {
        pub(crate) static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(include_str!($file)));
    };
}

script!(RECLAIM, "lua/reclaim.lua");
script!(REFRESH, "lua/refresh.lua");
script!(RETRY, "lua/retry.lua");
script!(DEAD, "lua/dead.lua");
script!(PROMOTE, "lua/promote.lua");
script!(RELEASE, "lua/release.lua");
script!(STATS, "lua/stats.lua");
script!(PUSH, "lua/push.lua");
script!(PUSH_DELAYED, "lua/push_delayed.lua");
script!(ACK, "lua/ack.lua");
script!(LIVE, "lua/live.lua");
script!(REPLAY, "lua/replay.lua");
