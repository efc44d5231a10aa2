//! What a process costs, read from `/proc`: resident memory, open descriptors, CPU time.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};

/// `pid`, or `"self"` for this process.
pub type Pid<'a> = &'a str;

/// Resident set size in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: Pid<'_>) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in {path}"))
}

/// Open file descriptors (entries of `/proc/PID/fd`).
pub fn open_fds(pid: Pid<'_>) -> Result<usize> {
    let path = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&path).with_context(|| path)?.count())
}

/// User + system CPU time of all the process's threads (`/proc/PID/stat`).
pub fn cpu_time(pid: Pid<'_>) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    // There, field 0 is the state (field 3 of proc(5)), so utime (14) and stime (15) are 11, 12.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unexpected {path}"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("field {} of {path}", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    let per_sec = rustix::param::clock_ticks_per_second().max(1);
    Ok(Duration::from_secs_f64(total as f64 / per_sec as f64))
}

/// CPU time of this process and of `other`, read together.
#[derive(Debug, Clone, Copy)]
pub struct CpuPair {
    pub this: Duration,
    pub other: Duration,
}

impl CpuPair {
    pub fn read(other: Pid<'_>) -> Result<CpuPair> {
        Ok(CpuPair {
            this: cpu_time("self")?,
            other: cpu_time(other)?,
        })
    }

    /// CPU spent since `earlier`.
    pub fn since(&self, earlier: &CpuPair) -> CpuPair {
        CpuPair {
            this: self.this.saturating_sub(earlier.this),
            other: self.other.saturating_sub(earlier.other),
        }
    }
}
