//! Who and what a run simulates: users and products.

use super::MICROS_PER_SECOND;

/// A product that can be viewed and bought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProductInfo {
    /// Catalog id.
    pub id: i64,
    /// Unit price in millionths of the currency unit.
    pub price_micros: i64,
}

/// The users and products a run simulates. Users earlier in the list are the
/// heavier ones, products earlier in the list the more popular ones.
#[derive(Debug, Clone)]
pub struct Population {
    /// User ids.
    pub users: Vec<i64>,
    /// Products.
    pub products: Vec<ProductInfo>,
}

impl Population {
    /// Users `1..=users` and products `1..=products`, with prices from 5 to
    /// 199 currency units spread over the ids.
    pub fn synthetic(users: u32, products: u32) -> Self {
        Self {
            users: (1..=i64::from(users)).collect(),
            products: (1..=i64::from(products))
                .map(|id| ProductInfo {
                    id,
                    price_micros: (5 + (id * 7919) % 195) * MICROS_PER_SECOND,
                })
                .collect(),
        }
    }
}
