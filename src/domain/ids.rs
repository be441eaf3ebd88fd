//! The ids of the four things a payment ties together: a member, a card, a schedule and a
//! payment. Each is a UUID v7 in a type of its own, so that a member's id passed where a card's
//! is wanted is a compile error, not a query that finds nothing. Their JSON, command-line,
//! email and log form is the plain hyphenated UUID; the store reads and writes them through
//! `crate::sqltypes`, as the `DbId` column it stores.

use uuid::Uuid;

/// Declares an id type: a [`Uuid`] that names one kind of thing.
macro_rules! typed_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
            serde::Serialize, serde::Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(Uuid);

        // No `Default`: an id made up where a value was merely missing would name nothing.
        #[allow(clippy::new_without_default)]
        impl $name {
            /// A new id (UUID v7: ordered by creation time).
            pub fn new() -> Self {
                $name(Uuid::now_v7())
            }

            /// The id as a UUID that names it, at the edges: the database, another
            /// system's metadata.
            pub const fn from_uuid(id: Uuid) -> Self {
                $name(id)
            }

            /// The plain UUID.
            pub const fn as_uuid(self) -> Uuid {
                self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Display::fmt(&self.0, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map($name)
            }
        }
    };
}

typed_id!(
    /// A member's id.
    MemberId
);
typed_id!(
    /// A card's id (a `payment_methods` row).
    CardId
);
typed_id!(
    /// A schedule's id.
    ScheduleId
);
typed_id!(
    /// A payment's id.
    PaymentId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_is_the_plain_hyphenated_uuid() {
        let text = "0193a5b2-7c1e-7d3f-9a41-2123456789bb";
        let uuid = Uuid::parse_str(text).unwrap();
        let id: PaymentId = text.parse().unwrap();
        assert_eq!(id.as_uuid(), uuid);
        assert_eq!(id.to_string(), text);
        assert_eq!(format!("{id}"), format!("{uuid}"));
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            serde_json::to_string(&uuid).unwrap()
        );
        assert_eq!(
            serde_json::from_str::<PaymentId>(&format!("\"{text}\"")).unwrap(),
            id
        );
        assert!("not-a-uuid".parse::<MemberId>().is_err());
    }

    #[test]
    fn new_ids_are_v7_and_distinct() {
        let (a, b) = (ScheduleId::new(), ScheduleId::new());
        assert_ne!(a, b);
        assert_eq!(a.as_uuid().get_version_num(), 7);
    }
}
