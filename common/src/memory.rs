//! Memory as a planned resource: what one worker of a variant takes, from the resident memory
//! its profile measured, and the bounds on what nodes and plans may declare.
//!
//! A worker's memory hardly depends on its cores but grows with its batch (the runtime's arenas
//! hold a batch's activations), so the planner reads it by batch: the peak resident memory the
//! profile measured at the planned batch or below (the profiler runs batches in ascending
//! order and reads the process's high-water mark), with [`HEADROOM`] on top. The agent limits
//! the worker's cgroup to what the plan gives it.

use tidal_proto::v1::ProfilePoint;

/// What a worker is planned above its measured peak: inputs larger than profiled, allocator
/// fragmentation over hours, a batch's outputs held while the next one runs.
pub const HEADROOM: f64 = 1.25;
/// Planned memory is rounded up to whole MiB (finer would only say more than was measured).
const GRANULE: u64 = 1 << 20;
/// Most memory a node may declare (1 PiB): bounds every sum the planner and validation make.
pub const MAX_NODE_BYTES: u64 = 1 << 50;

/// A variant's measured peak resident memory by batch size (ascending), from its profile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryCurve(Vec<(u32, u64)>);

impl MemoryCurve {
    /// Per batch size, the largest resident memory measured at it (any cores, any input size);
    /// points that measured none (profiles from before memory was measured) are left out.
    pub fn new(points: &[ProfilePoint]) -> Self {
        let mut by_batch: Vec<(u32, u64)> = Vec::new();
        for p in points.iter().filter(|p| p.resident_bytes > 0 && p.batch > 0) {
            match by_batch.iter_mut().find(|(b, _)| *b == p.batch) {
                Some((_, bytes)) => *bytes = (*bytes).max(p.resident_bytes),
                None => by_batch.push((p.batch, p.resident_bytes)),
            }
        }
        by_batch.sort_unstable();
        Self(by_batch)
    }

    /// Whether the profile measured any memory.
    pub fn is_measured(&self) -> bool {
        !self.0.is_empty()
    }

    /// The peak resident memory of a worker running batches up to `batch`: the largest
    /// measured at that batch or below, else (a batch smaller than any measured) the smallest
    /// batch's; 0 when nothing was measured.
    pub fn resident_at(&self, batch: u32) -> u64 {
        let below = self.0.iter().filter(|(b, _)| *b <= batch).map(|&(_, bytes)| bytes).max();
        below.or_else(|| self.0.first().map(|&(_, bytes)| bytes)).unwrap_or(0)
    }

    /// The memory planned for a worker with batches up to `batch`: the resident peak with
    /// [`HEADROOM`], in whole MiB; 0 when nothing was measured (the worker is then not counted
    /// against its node's memory, and not limited).
    pub fn worker_bytes(&self, batch: u32) -> u64 {
        planned_bytes(self.resident_at(batch))
    }
}

/// The cgroup limit of a worker planned `planned` bytes (0: none): twice the plan, because a
/// resize in place builds the session for the new thread count beside the one serving (see
/// the agent's `worker_process`) and a worker must not be killed for following its quota. The
/// plan counts one session; the limit stops a worker that grows past two.
pub fn cgroup_limit(planned: u64) -> u64 {
    planned.saturating_mul(2)
}

/// The profile of a variant whose worker the OOM killer killed with `killed_at` bytes planned
/// at batch `batch`: every point's resident memory doubled, so that its workers are planned
/// (and limited) twice as large; `None` when the profile already plans such a worker above
/// what that one was given (a kill under an older plan) or measured no memory.
pub fn raised(points: &[ProfilePoint], killed_at: u64, batch: u32) -> Option<Vec<ProfilePoint>> {
    let curve = MemoryCurve::new(points);
    if !curve.is_measured() || curve.worker_bytes(batch.max(1)) > killed_at {
        return None;
    }
    let raised = points
        .iter()
        .map(|p| ProfilePoint { resident_bytes: p.resident_bytes.saturating_mul(2).min(MAX_NODE_BYTES), ..*p })
        .collect();
    Some(raised)
}

/// `resident` bytes with [`HEADROOM`], rounded up to whole MiB (bounded by [`MAX_NODE_BYTES`]).
pub fn planned_bytes(resident: u64) -> u64 {
    if resident == 0 {
        return 0;
    }
    let with_headroom = (resident.min(MAX_NODE_BYTES) as f64 * HEADROOM).ceil() as u64;
    // Bounded as a node's memory is, so that no profile plans a worker a plan may not hold.
    (with_headroom.div_ceil(GRANULE) * GRANULE).min(MAX_NODE_BYTES)
}

/// Bytes as a person reads them: "512 MiB", "1.5 GiB".
pub fn human(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.1} GiB", b / GIB)
    } else {
        format!("{:.0} MiB", b / MIB)
    }
}

/// Reads "24G", "512M", "1.5GiB", "1048576" (bytes) as bytes; binary units (K = 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a size such as 512M, 24G or 1048576"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("{text:?}: unknown unit {other:?} (use K, M, G or T)")),
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes > MAX_NODE_BYTES as f64 {
        return Err(format!("{text:?} is more than {}", human(MAX_NODE_BYTES)));
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(cores: u32, batch: u32, resident_bytes: u64) -> ProfilePoint {
        ProfilePoint { cores, batch, resident_bytes, ..Default::default() }
    }

    #[test]
    fn a_worker_is_planned_at_the_peak_measured_up_to_its_batch_with_headroom() {
        const MIB: u64 = 1 << 20;
        let curve = MemoryCurve::new(&[
            point(1, 1, 148 * MIB),
            point(2, 1, 150 * MIB),
            point(1, 8, 185 * MIB),
            point(1, 4, 170 * MIB),
            point(1, 2, 0),
        ]);
        assert!(curve.is_measured());
        assert_eq!(curve.resident_at(1), 150 * MIB, "the largest over cores");
        assert_eq!(curve.resident_at(6), 170 * MIB, "the peak at batches up to it");
        assert_eq!(curve.resident_at(64), 185 * MIB);
        assert_eq!(curve.worker_bytes(8), 232 * MIB, "185 MiB × 1.25 = 231.25, rounded up to whole MiB");
        let from_batch_4 = MemoryCurve::new(&[point(1, 4, 100 * MIB)]);
        assert_eq!(from_batch_4.resident_at(1), 100 * MIB, "below every measured batch: the smallest measured");
        let unmeasured = MemoryCurve::new(&[point(1, 1, 0)]);
        assert!(!unmeasured.is_measured());
        assert_eq!(unmeasured.worker_bytes(8), 0, "not measured: not planned");
    }

    #[test]
    fn an_oom_kill_doubles_the_memory_profile_once_per_plan() {
        const MIB: u64 = 1 << 20;
        let profile = [point(1, 1, 40 * MIB), point(1, 8, 60 * MIB)];
        let planned = MemoryCurve::new(&profile).worker_bytes(8);
        let raised = raised(&profile, planned, 8).expect("raised");
        assert_eq!(raised.iter().map(|p| p.resident_bytes).collect::<Vec<_>>(), [80 * MIB, 120 * MIB]);
        assert!(MemoryCurve::new(&raised).worker_bytes(8) >= 2 * planned - MIB);
        // Another worker killed under the old plan: not raised again.
        assert_eq!(super::raised(&raised, planned, 8), None);
        assert_eq!(super::raised(&[point(1, 1, 0)], planned, 8), None, "no memory measured: nothing to raise");
    }

    #[test]
    fn sizes_read_in_binary_units_and_bad_ones_are_refused() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("24g"), Ok(24 << 30));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("9999999T").is_err(), "beyond the bound");
        assert_eq!(human(512 << 20), "512 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
