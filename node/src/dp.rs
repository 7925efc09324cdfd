//! Differential privacy at the node: exact discrete Laplace noise and the privacy budget.
//!
//! Noise is sampled exactly, with integer arithmetic only (the algorithm of Canonne, Kamath and
//! Steinke, "The Discrete Gaussian for Differential Privacy", 2020): no floating point, so no
//! gaps or biases in the distribution that naive `-ln(U)/epsilon` sampling leaks. The random
//! bits come from ChaCha20 (a cryptographically secure generator) seeded by a keyed hash of the
//! node's secret, the query's canonical content and the data snapshot: the same query on the
//! same data always gets the same noise (averaging repeats gains nothing), a data reload gets
//! fresh noise, and nobody without the secret can predict it.
//!
//! Each cell of a count table gets independent noise with scale 1/epsilon: one person changes
//! one cell by one, so the table is epsilon-differentially private. Totals and margins are
//! sums of the noisy cells (post-processing).
//!
//! The budget (`state_dir/privacy-budget.json`) records epsilon spent per study and in all;
//! a query is charged once, before it is computed, and a repeat of a paid query (same content,
//! same snapshot) is free. When a study's or the node's budget would be passed, the node
//! refuses.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fedq_proto::rational::Rational;
use hmac::{Hmac, Mac};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::NodeError;
use crate::disclosure::{DisclosedTable, Outcome};
use crate::records::NodeSecret;

/// A Bernoulli(num/den) draw, exact.
fn bernoulli(rng: &mut impl Rng, num: u64, den: u64) -> bool {
    rng.random_range(0..den) < num
}

/// A Bernoulli(exp(-num/den)) draw, exact (Canonne, Kamath, Steinke, Algorithm 1).
fn bernoulli_exp(rng: &mut impl Rng, num: u64, den: u64) -> bool {
    if num <= den {
        // gamma in [0, 1]: count successes of Bernoulli(gamma / k) for k = 1, 2, ...
        let mut k: u64 = 1;
        loop {
            if !bernoulli(rng, num, den.saturating_mul(k)) {
                return k % 2 == 1;
            }
            k += 1;
        }
    }
    for _ in 0..num / den {
        if !bernoulli_exp(rng, 1, 1) {
            return false;
        }
    }
    bernoulli_exp(rng, num % den, den)
}

/// One draw of the discrete Laplace distribution with scale `s/t` (P(x) ∝ exp(-|x| t / s)),
/// exact (Canonne, Kamath, Steinke, Algorithm 2).
pub fn discrete_laplace(rng: &mut impl Rng, s: u64, t: u64) -> i64 {
    loop {
        let u = rng.random_range(0..s);
        if !bernoulli_exp(rng, u, s) {
            continue;
        }
        let mut v: u64 = 0;
        while bernoulli_exp(rng, 1, 1) {
            v += 1;
        }
        let x = u + s * v;
        let y = (x / t) as i64;
        let negative = bernoulli(rng, 1, 2);
        if negative && y == 0 {
            continue;
        }
        return if negative { -y } else { y };
    }
}

/// The variance of discrete Laplace noise with parameter epsilon (scale 1/epsilon):
/// 2 e^-ε / (1 - e^-ε)^2. For reports only.
pub fn noise_variance(epsilon: Rational) -> f64 {
    let decay = (-epsilon.approximate()).exp();
    2.0 * decay / (1.0 - decay).powi(2)
}

/// The generator for one query's noise: ChaCha20 seeded by HMAC-SHA-256(node secret, query
/// content, snapshot).
pub fn noise_generator(secret: &NodeSecret, query_content: &[u8], snapshot: &str) -> ChaCha20Rng {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.bytes()).expect("any key length");
    mac.update(b"fedq.noise/1\0");
    mac.update(&(query_content.len() as u64).to_be_bytes());
    mac.update(query_content);
    mac.update(snapshot.as_bytes());
    let seed: [u8; 32] = mac.finalize().into_bytes().into();
    ChaCha20Rng::from_seed(seed)
}

/// Adds noise with parameter `epsilon` to every cell (in grid order, so the same generator
/// gives the same noise), clamps at zero, and derives the total from the noisy cells; withheld
/// cells stay withheld (their noisy values only ever enter the total). Returns the noise
/// variance of each released cell.
pub fn add_noise(
    table: &mut DisclosedTable,
    true_counts: &[u64],
    epsilon: Rational,
    rng: &mut impl Rng,
) -> f64 {
    // Scale 1/epsilon = den/num.
    let (s, t) = (epsilon.denominator(), epsilon.numerator());
    let mut total: u64 = 0;
    for (outcome, &count) in table.cells.iter_mut().zip(true_counts) {
        let noisy = (count as i64)
            .saturating_add(discrete_laplace(rng, s, t))
            .max(0) as u64;
        total += noisy;
        if let Outcome::Released(value) = outcome {
            *value = noisy;
        }
    }
    if let Outcome::Released(value) = &mut table.total {
        *value = total;
    }
    table
        .mechanisms
        .insert(fedq_proto::wire::Mechanism::DifferentialPrivacy);
    noise_variance(epsilon)
}

/// Budget file name in the state directory.
const BUDGET_FILE: &str = "privacy-budget.json";

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ledger {
    node_spent: Option<Rational>,
    /// Study id → epsilon spent.
    studies: BTreeMap<String, Rational>,
    /// Queries already paid for (hash of content and snapshot): repeats are free.
    paid: BTreeSet<String>,
}

/// What a query costs and under which limits.
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    pub study: &'a str,
    pub epsilon: Rational,
    pub study_budget: Rational,
    pub node_budget: Rational,
}

/// The node's persistent privacy budget.
#[derive(Debug)]
pub struct PrivacyBudget {
    path: PathBuf,
    ledger: Mutex<Ledger>,
}

impl PrivacyBudget {
    pub fn open(state_dir: &Path) -> Result<PrivacyBudget, String> {
        let path = state_dir.join(BUDGET_FILE);
        let ledger = if path.exists() {
            let text = std::fs::read_to_string(&path)
                .map_err(|err| format!("{}: {err}", path.display()))?;
            serde_json::from_str(&text).map_err(|err| {
                format!(
                    "{} is damaged ({err}); restore it from the node's backup — deleting it would reset every study's privacy budget",
                    path.display()
                )
            })?
        } else {
            Ledger::default()
        };
        Ok(PrivacyBudget {
            path,
            ledger: Mutex::new(ledger),
        })
    }

    /// Charges `charge` for query `key` durably, unless `key` was paid already (then free).
    /// Returns what was spent. Refuses, spending nothing, when a budget would be passed.
    pub fn charge(&self, key: &str, charge: Charge<'_>) -> Result<Rational, NodeError> {
        let mut ledger = self.ledger.lock().map_err(|_| NodeError::Engine)?;
        if ledger.paid.contains(key) {
            return Ok(Rational::ZERO);
        }
        let study_spent = ledger
            .studies
            .get(charge.study)
            .copied()
            .unwrap_or(Rational::ZERO);
        let node_spent = ledger.node_spent.unwrap_or(Rational::ZERO);
        let exhausted = |spent: Rational, budget: Rational| {
            spent
                .checked_add(charge.epsilon)
                .is_none_or(|after| after > budget)
        };
        if exhausted(study_spent, charge.study_budget) {
            return Err(NodeError::BudgetExhausted {
                scope: format!("study '{}'", charge.study),
                spent: study_spent.to_string(),
                budget: charge.study_budget.to_string(),
            });
        }
        if exhausted(node_spent, charge.node_budget) {
            return Err(NodeError::BudgetExhausted {
                scope: "this site (all studies together)".into(),
                spent: node_spent.to_string(),
                budget: charge.node_budget.to_string(),
            });
        }
        let mut next = ledger.clone();
        next.studies.insert(
            charge.study.to_string(),
            study_spent
                .checked_add(charge.epsilon)
                .ok_or(NodeError::Engine)?,
        );
        next.node_spent = Some(
            node_spent
                .checked_add(charge.epsilon)
                .ok_or(NodeError::Engine)?,
        );
        next.paid.insert(key.to_string());
        self.write(&next)?;
        *ledger = next;
        Ok(charge.epsilon)
    }

    /// Epsilon spent by all studies together.
    pub fn node_spent(&self) -> Rational {
        self.ledger
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .node_spent
            .unwrap_or(Rational::ZERO)
    }

    /// Epsilon spent by `study` and by the node in all.
    pub fn spent(&self, study: &str) -> (Rational, Rational) {
        let ledger = self
            .ledger
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (
            ledger.studies.get(study).copied().unwrap_or(Rational::ZERO),
            ledger.node_spent.unwrap_or(Rational::ZERO),
        )
    }

    fn write(&self, ledger: &Ledger) -> Result<(), NodeError> {
        let text = serde_json::to_vec_pretty(ledger).map_err(|_| NodeError::Engine)?;
        let temporary = self.path.with_extension("tmp");
        let written = std::fs::File::create(&temporary)
            .and_then(|mut file| {
                file.write_all(&text)?;
                file.sync_all()
            })
            .and_then(|()| std::fs::rename(&temporary, &self.path))
            .and_then(|()| {
                std::fs::File::open(self.path.parent().unwrap_or(Path::new(".")))?.sync_all()
            });
        written.map_err(|err| {
            tracing::error!(error = %err, "privacy budget not written; query refused");
            NodeError::StateUnwritable
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rational(text: &str) -> Rational {
        Rational::parse(text).unwrap()
    }

    #[test]
    fn bernoulli_exp_matches_its_probability() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for (num, den) in [(1u64, 2u64), (1, 1), (3, 1), (0, 1)] {
            let draws = 40_000;
            let hits = (0..draws)
                .filter(|_| bernoulli_exp(&mut rng, num, den))
                .count();
            let expected = (-(num as f64) / den as f64).exp();
            let observed = hits as f64 / draws as f64;
            assert!(
                (observed - expected).abs() < 0.01,
                "exp(-{num}/{den}): observed {observed}, expected {expected}"
            );
        }
    }

    #[test]
    fn discrete_laplace_is_centred_with_the_right_variance_and_shape() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let epsilon = rational("1/2");
        let draws = 60_000;
        let samples: Vec<i64> = (0..draws)
            .map(|_| discrete_laplace(&mut rng, epsilon.denominator(), epsilon.numerator()))
            .collect();
        let mean = samples.iter().sum::<i64>() as f64 / draws as f64;
        let variance = samples
            .iter()
            .map(|x| (*x as f64 - mean).powi(2))
            .sum::<f64>()
            / draws as f64;
        let expected = noise_variance(epsilon);
        assert!(mean.abs() < 0.1, "mean {mean}");
        assert!(
            (variance - expected).abs() / expected < 0.05,
            "variance {variance}, expected {expected}"
        );
        // P(0) / P(1) = e^epsilon for the discrete Laplace.
        let zeros = samples.iter().filter(|x| **x == 0).count() as f64;
        let ones = samples.iter().filter(|x| **x == 1).count() as f64;
        let ratio = zeros / ones;
        assert!((ratio - 0.5f64.exp()).abs() < 0.08, "ratio {ratio}");
    }

    #[test]
    fn the_same_key_content_and_snapshot_give_the_same_noise_and_others_do_not() {
        let secret = NodeSecret::ephemeral();
        let draw = |content: &[u8], snapshot: &str| {
            let mut rng = noise_generator(&secret, content, snapshot);
            (0..20)
                .map(|_| discrete_laplace(&mut rng, 1, 1))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(b"q", "s1"), draw(b"q", "s1"));
        assert_ne!(draw(b"q", "s1"), draw(b"q", "s2"));
        assert_ne!(draw(b"q", "s1"), draw(b"r", "s1"));
    }

    #[test]
    fn budgets_are_spent_once_per_query_enforced_and_kept_across_reopening() {
        let state = tempfile::tempdir().unwrap();
        let charge = Charge {
            study: "s",
            epsilon: rational("2/5"),
            study_budget: rational("1"),
            node_budget: rational("10"),
        };
        {
            let budget = PrivacyBudget::open(state.path()).unwrap();
            assert_eq!(budget.charge("q1", charge).unwrap(), rational("2/5"));
            assert_eq!(
                budget.charge("q1", charge).unwrap(),
                Rational::ZERO,
                "a repeat is free"
            );
            assert_eq!(budget.charge("q2", charge).unwrap(), rational("2/5"));
        }
        let budget = PrivacyBudget::open(state.path()).unwrap();
        assert_eq!(budget.spent("s"), (rational("4/5"), rational("4/5")));
        let err = budget.charge("q3", charge).unwrap_err();
        assert!(err.to_string().contains("privacy budget"), "{err}");
        assert_eq!(
            budget.spent("s").0,
            rational("4/5"),
            "a refusal spends nothing"
        );
        // The node-wide cap binds across studies.
        let other = Charge {
            study: "t",
            node_budget: rational("1"),
            ..charge
        };
        let err = budget.charge("q4", other).unwrap_err();
        assert!(err.to_string().contains("all studies"), "{err}");
    }
}
