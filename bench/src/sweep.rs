//! The knee search: step the offered load up by a factor until a step loses more than 0.1 %,
//! then bisect (geometrically) between the last good and the first bad rate. Bounded in steps.

/// How a step ended, for the search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Loss at or under the threshold, generator not saturated.
    Pass,
    /// Too much loss.
    Fail,
    /// Loss-free, but the generator itself was saturated: going higher would measure the
    /// harness, so the search stops and the knee is a lower bound.
    GeneratorLimit,
}

/// The search state.
#[derive(Debug, Clone)]
pub struct Sweep {
    start: f64,
    factor: f64,
    max_pps: f64,
    good: Option<f64>,
    bad: Option<f64>,
    refine_left: u32,
    steps_left: u32,
    limited: bool,
}

impl Sweep {
    /// A search from `start` pps, multiplying by `factor`, never above `max_pps`, with
    /// `refine` bisection steps and at most `max_steps` steps in all.
    pub fn new(start: f64, factor: f64, max_pps: f64, refine: u32, max_steps: u32) -> Self {
        Self {
            start: start.max(1.0),
            factor: factor.max(1.05),
            max_pps: max_pps.max(start.max(1.0)),
            good: None,
            bad: None,
            refine_left: refine,
            steps_left: max_steps,
            limited: false,
        }
    }

    /// The rate of the next step, `None` when the search is over.
    pub fn next(&self) -> Option<f64> {
        if self.steps_left == 0 || self.limited {
            return None;
        }
        match (self.good, self.bad) {
            (None, None) => Some(self.start),
            (Some(g), None) if g >= self.max_pps => None,
            (Some(g), None) => Some((g * self.factor).min(self.max_pps).round()),
            (good, Some(b)) => {
                if self.refine_left == 0 {
                    return None;
                }
                let g = good.unwrap_or(0.0);
                if g > 0.0 && b / g < 1.05 {
                    return None; // within 5 %: good enough
                }
                let next = if g > 0.0 { (g * b).sqrt() } else { b / 2.0 };
                (next >= 1.0).then_some(next.round())
            }
        }
    }

    /// Records the outcome of a step at `rate`.
    pub fn record(&mut self, rate: f64, outcome: Outcome) {
        self.steps_left = self.steps_left.saturating_sub(1);
        if self.bad.is_some() {
            self.refine_left = self.refine_left.saturating_sub(1);
        }
        match outcome {
            Outcome::Pass => self.good = Some(self.good.map_or(rate, |g| g.max(rate))),
            Outcome::GeneratorLimit => {
                self.good = Some(self.good.map_or(rate, |g| g.max(rate)));
                self.limited = true;
            }
            Outcome::Fail => self.bad = Some(self.bad.map_or(rate, |b| b.min(rate))),
        }
    }

    /// The highest loss-free rate found.
    pub fn knee(&self) -> Option<f64> {
        self.good
    }

    /// Whether the search stopped at the generator's limit.
    pub fn limited_by_generator(&self) -> bool {
        self.limited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a search against a server that loses above `capacity`.
    fn search(capacity: f64, start: f64) -> (Option<f64>, Vec<f64>) {
        let mut s = Sweep::new(start, 2.0, 1e7, 4, 20);
        let mut rates = Vec::new();
        while let Some(rate) = s.next() {
            rates.push(rate);
            s.record(
                rate,
                if rate <= capacity {
                    Outcome::Pass
                } else {
                    Outcome::Fail
                },
            );
        }
        (s.knee(), rates)
    }

    #[test]
    fn the_search_grows_then_bisects_towards_the_knee() {
        let (knee, rates) = search(50_000.0, 1000.0);
        assert_eq!(
            &rates[..7],
            &[1000.0, 2000.0, 4000.0, 8000.0, 16000.0, 32000.0, 64000.0]
        );
        let knee = knee.unwrap();
        assert!((40_000.0..=50_000.0).contains(&knee), "{knee}");
    }

    #[test]
    fn a_server_failing_at_the_first_step_is_searched_downwards() {
        let (knee, rates) = search(300.0, 1000.0);
        assert_eq!(rates[1], 500.0);
        assert!(knee.is_some_and(|k| k <= 300.0));
    }

    #[test]
    fn the_search_is_bounded_in_steps_and_rate() {
        let mut s = Sweep::new(1.0, 2.0, 100.0, 3, 5);
        let mut n = 0;
        while let Some(rate) = s.next() {
            assert!(rate <= 100.0);
            s.record(rate, Outcome::Pass);
            n += 1;
        }
        assert_eq!(n, 5);
    }

    #[test]
    fn a_saturated_generator_ends_the_search_with_a_lower_bound() {
        let mut s = Sweep::new(1000.0, 2.0, 1e6, 3, 10);
        s.record(1000.0, Outcome::Pass);
        s.record(2000.0, Outcome::GeneratorLimit);
        assert_eq!(
            (s.next(), s.knee(), s.limited_by_generator()),
            (None, Some(2000.0), true)
        );
    }
}
