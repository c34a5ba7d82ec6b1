//! `rtap.v1.ProductService`: products, unique by name.

use entity::product::{self, Column};
use rtap::v1::{
    CreateProductRequest, CreateProductResponse, DeleteProductRequest, DeleteProductResponse,
    GetProductRequest, GetProductResponse, ListProductsRequest, ListProductsResponse, Product,
    UpdateProductRequest, UpdateProductResponse,
    product_service_server::{ProductService, ProductServiceServer},
};
use sea_orm::ColumnTrait;

use super::service::resource_service;
use super::{
    resource::{
        Changes, Field, Filters, Resource, ResourceApi, Standard, message_from_row, starts_with,
    },
    rules::{self, Violations},
};
use crate::error::Error;

impl Resource for product::Entity {
    type Message = Product;
    fn to_proto(row: product::Model) -> Product {
        message_from_row!(row => Product { id, name, category, price })
    }

    const SORT_FIELDS: &'static [Column] = &[Column::Name, Column::Category, Column::Price];
    const STANDARD: Standard<Column> =
        Standard::new(Column::Id, Column::CreateTime, Column::UpdateTime);
    type ListRequest = ListProductsRequest;
    /// `name_prefix` matches the start of the name, ignoring case;
    /// `category` the whole category, exactly.
    fn filters(request: &ListProductsRequest) -> Result<Filters, Error> {
        let mut violations = Violations::default();
        let prefix = violations.check(rules::filter("name_prefix", &request.name_prefix));
        let category = violations.check(rules::filter("category", &request.category));
        let (prefix, category) = violations.finish(prefix.zip(category))?;
        Ok(Filters::default()
            .with(prefix.to_lowercase(), |prefix| {
                starts_with(Column::Name, prefix)
            })
            .with(category, |category| Column::Category.eq(category)))
    }

    const MUTABLE_FIELDS: &'static [(Column, Field<Product>)] = &[
        (Column::Name, Field::Name(|product| &product.name)),
        (Column::Category, Field::Name(|product| &product.category)),
        (Column::Price, Field::Price(|product| product.price)),
    ];
    const NAME: &'static str = "product";
    /// Products are unique by name; an update that leaves the name alone
    /// names none.
    fn conflict(changes: &Changes<Self>) -> String {
        let name = changes.text(Column::Name).unwrap_or("");
        format!("a product named {name:?} (names compare case-insensitively)")
    }
}

resource_service! {
    impl ProductService for ResourceApi<product::Entity> as ProductServiceServer {
        resource: product, list: products,
        get_product(GetProductRequest) -> GetProductResponse,
        list_products(ListProductsRequest) -> ListProductsResponse,
        create_product(CreateProductRequest) -> CreateProductResponse,
        update_product(UpdateProductRequest) -> UpdateProductResponse,
        delete_product(DeleteProductRequest) -> DeleteProductResponse,
    }
}
