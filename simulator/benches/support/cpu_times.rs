//! CPU time read from `/proc` (Linux), for the benches that print the CPU
//! their work costs next to its rate. Shared by the simulator's produce
//! bench and the server's ingest bench.

/// CPU time in use, in seconds: on the whole machine (every process, from
/// the aggregate line of `/proc/stat`) and by this bench (`/proc/self/stat`).
/// Linux reports both in ticks of `USER_HZ`, 100 on every architecture's ABI.
#[derive(Debug, Clone, Copy)]
pub struct CpuTimes {
    /// Every process on the machine.
    pub machine: f64,
    /// This process.
    pub bench: f64,
}

impl CpuTimes {
    const TICKS_PER_SECOND: f64 = 100.0;

    /// `None` where `/proc` is missing or unreadable (not Linux).
    pub fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        // `cpu  user nice system idle iowait irq softirq steal guest
        // guest_nice`: busy is user, nice, system, irq and softirq (guest
        // time is inside user; steal went to other machines).
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .map(|field| field.parse().ok())
            .collect::<Option<_>>()?;
        let busy: u64 = [0, 1, 2, 5, 6]
            .iter()
            .map(|&field| ticks.get(field).copied().unwrap_or(0))
            .sum();
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which may hold spaces: state is the
        // first, utime the 12th, stime the 13th.
        let fields: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |index: usize| fields.get(index)?.parse::<u64>().ok();
        Some(Self {
            machine: busy as f64 / Self::TICKS_PER_SECOND,
            bench: (field(11)? + field(12)?) as f64 / Self::TICKS_PER_SECOND,
        })
    }

    /// The CPU time used since `self` was read.
    pub fn until_now(self) -> Option<Self> {
        let now = Self::now()?;
        Some(Self {
            machine: now.machine - self.machine,
            bench: now.bench - self.bench,
        })
    }
}
