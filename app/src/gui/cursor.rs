//! The time cursor: which step of the selected run the panels show, and how it moves (rerun's play states).

/// How the cursor moves on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlayMode {
    /// Sticks to the newest step while a run streams in.
    Following,
    /// Stays where the user put it.
    Paused,
    /// Advances at `steps_per_second`, then stops at the last step.
    Playing,
}

impl PlayMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Following => "Following",
            Self::Paused => "Paused",
            Self::Playing => "Playing",
        }
    }
}

/// A step index into the selected run's trace and a play mode.
#[derive(Clone, Debug, PartialEq)]
pub struct TimeCursor {
    pub step: usize,
    pub mode: PlayMode,
    pub steps_per_second: f32,
    /// Fraction of a step accumulated while playing, so slow rates still advance.
    carry: f32,
}

impl Default for TimeCursor {
    fn default() -> Self {
        Self {
            step: 0,
            mode: PlayMode::Following,
            steps_per_second: 8.0,
            carry: 0.0,
        }
    }
}

/// A request to move the cursor; panels send these, the app applies them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CursorMove {
    To(usize),
    Back,
    Forward,
    First,
    /// Jump to the newest step and keep following it.
    Follow,
    Play,
    Pause,
    SetRate(f32),
}

impl TimeCursor {
    /// Keeps the cursor inside a run of `len` steps; while following, moves it to the newest step.
    pub fn sync(&mut self, len: usize) {
        let last = len.saturating_sub(1);
        if self.mode == PlayMode::Following || self.step > last {
            self.step = last;
        }
    }

    pub fn apply(&mut self, movement: CursorMove, len: usize) {
        let last = len.saturating_sub(1);
        match movement {
            CursorMove::To(step) => self.pause_at(step.min(last)),
            CursorMove::Back => self.pause_at(self.step.saturating_sub(1)),
            CursorMove::Forward => self.pause_at((self.step + 1).min(last)),
            CursorMove::First => self.pause_at(0),
            CursorMove::Follow => {
                self.mode = PlayMode::Following;
                self.step = last;
            }
            CursorMove::Play => {
                // Playing from the end would stop at once; start over instead, as a video player does.
                if self.step >= last {
                    self.step = 0;
                }
                self.mode = PlayMode::Playing;
                self.carry = 0.0;
            }
            CursorMove::Pause => self.mode = PlayMode::Paused,
            CursorMove::SetRate(rate) => self.steps_per_second = rate.clamp(0.5, 120.0),
        }
    }

    /// Advances a playing cursor by `dt` seconds. At the last step it follows a live run and pauses on a
    /// finished one. Returns true while it still needs frames.
    pub fn advance(&mut self, dt: f32, len: usize, run_is_live: bool) -> bool {
        if self.mode != PlayMode::Playing {
            return false;
        }
        let last = len.saturating_sub(1);
        self.carry += dt * self.steps_per_second;
        let whole = self.carry.floor();
        self.carry -= whole;
        self.step = (self.step + whole as usize).min(last);
        if self.step >= last {
            self.mode = if run_is_live {
                PlayMode::Following
            } else {
                PlayMode::Paused
            };
            return false;
        }
        true
    }

    fn pause_at(&mut self, step: usize) {
        self.step = step;
        self.mode = PlayMode::Paused;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn following_sticks_to_the_newest_step_and_moving_pauses() {
        let mut c = TimeCursor::default();
        c.sync(5);
        assert_eq!(c.step, 4);
        c.apply(CursorMove::Back, 5);
        assert_eq!((c.step, c.mode), (3, PlayMode::Paused));
        c.sync(9);
        assert_eq!(c.step, 3, "a paused cursor stays put while steps arrive");
        c.apply(CursorMove::Follow, 9);
        assert_eq!((c.step, c.mode), (8, PlayMode::Following));
    }

    #[test]
    fn playing_advances_and_stops_at_the_end() {
        let mut c = TimeCursor {
            step: 0,
            mode: PlayMode::Paused,
            steps_per_second: 10.0,
            carry: 0.0,
        };
        c.apply(CursorMove::Play, 4);
        assert!(c.advance(0.15, 4, false));
        assert_eq!(c.step, 1);
        assert!(!c.advance(1.0, 4, false));
        assert_eq!((c.step, c.mode), (3, PlayMode::Paused));
    }
}
