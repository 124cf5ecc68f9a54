//! A generational slab: state lives here, indexed by ids that epoll tokens carry. A stale id
//! (its slot freed and reused) never reaches the new occupant.

/// An index plus the generation of the slot when the id was handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id {
    pub index: u32,
    pub generation: u32,
}

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    pub fn insert(&mut self, value: T) -> Id {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.value = Some(value);
            return Id {
                index,
                generation: slot.generation,
            };
        }
        self.slots.push(Slot {
            generation: 0,
            value: Some(value),
        });
        Id {
            index: (self.slots.len() - 1) as u32,
            generation: 0,
        }
    }

    pub fn get(&self, id: Id) -> Option<&T> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.value.as_ref()
    }

    pub fn get_mut(&mut self, id: Id) -> Option<&mut T> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.value.as_mut()
    }

    pub fn remove(&mut self, id: Id) -> Option<T> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation || slot.value.is_none() {
            return None;
        }
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.index);
        self.len -= 1;
        slot.value.take()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn ids(&self) -> Vec<Id> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.value.is_some())
            .map(|(i, s)| Id {
                index: i as u32,
                generation: s.generation,
            })
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Id, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.value.as_ref().map(|v| {
                (
                    Id {
                        index: i as u32,
                        generation: s.generation,
                    },
                    v,
                )
            })
        })
    }
}

/// What an epoll token names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    Listener,
    Timer,
    Signals,
    Peer(Id),
    Uffd(Id),
    Pidfd(Id),
    /// `umm lazy-pages`: the connection from `criu restore` handing over the tasks' uffds.
    Handoff,
    /// `--control`: the control socket's listener.
    ControlListener,
    /// `umm daemon --metrics`: the HTTP listener.
    MetricsListener,
    /// A connection to either of those.
    ControlConn(Id),
    /// `umm lazy-pages --page-server`: replies from the page server are waiting.
    PageServer,
    /// `umm attach --strict`: the syscall tracer has requests.
    Tracer,
}

const KIND_SHIFT: u32 = 56;
const GEN_MASK: u64 = 0x00ff_ffff;

impl Token {
    pub fn encode(self) -> u64 {
        let (kind, id) = match self {
            Token::Listener => (1u64, None),
            Token::Timer => (2, None),
            Token::Signals => (3, None),
            Token::Peer(id) => (4, Some(id)),
            Token::Uffd(id) => (5, Some(id)),
            Token::Pidfd(id) => (6, Some(id)),
            Token::Handoff => (7, None),
            Token::ControlListener => (8, None),
            Token::MetricsListener => (9, None),
            Token::ControlConn(id) => (10, Some(id)),
            Token::PageServer => (11, None),
            Token::Tracer => (12, None),
        };
        let id_bits = id.map_or(0, |id| {
            ((id.generation as u64 & GEN_MASK) << 32) | id.index as u64
        });
        (kind << KIND_SHIFT) | id_bits
    }

    /// Decode; the generation is truncated to 24 bits in the token, so ids are compared after
    /// the same truncation by the slab lookups (see `matches_id`).
    pub fn decode(v: u64) -> Option<Token> {
        let id = Id {
            index: v as u32,
            generation: ((v >> 32) & GEN_MASK) as u32,
        };
        Some(match v >> KIND_SHIFT {
            1 => Token::Listener,
            2 => Token::Timer,
            3 => Token::Signals,
            4 => Token::Peer(id),
            5 => Token::Uffd(id),
            6 => Token::Pidfd(id),
            7 => Token::Handoff,
            8 => Token::ControlListener,
            9 => Token::MetricsListener,
            10 => Token::ControlConn(id),
            11 => Token::PageServer,
            12 => Token::Tracer,
            _ => return None,
        })
    }
}

impl<T> Slab<T> {
    /// The live id in slot `index` whose generation matches a token's 24-bit generation.
    pub fn resolve(&self, token_id: Id) -> Option<Id> {
        let slot = self.slots.get(token_id.index as usize)?;
        slot.value.as_ref()?;
        ((slot.generation as u64 & GEN_MASK) as u32 == token_id.generation).then_some(Id {
            index: token_id.index,
            generation: slot.generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_ids_do_not_reach_a_reused_slot() {
        let mut s = Slab::default();
        let a = s.insert("a");
        assert_eq!(s.remove(a), Some("a"));
        let b = s.insert("b");
        assert_eq!(a.index, b.index);
        assert_eq!(s.get(a), None);
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.remove(a), None);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn tokens_round_trip_and_resolve() {
        let mut s = Slab::default();
        let id = s.insert(1);
        for t in [
            Token::Listener,
            Token::Timer,
            Token::Signals,
            Token::Uffd(id),
            Token::Peer(id),
            Token::ControlListener,
            Token::MetricsListener,
            Token::ControlConn(id),
            Token::PageServer,
            Token::Tracer,
        ] {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_eq!(s.resolve(id), Some(id));
        s.remove(id);
        assert_eq!(s.resolve(id), None);
        assert_eq!(Token::decode(0), None);
    }
}
